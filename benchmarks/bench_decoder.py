# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""mpseg's MaskedAttentionDecoder and MSDeformAttnPixelDecoder against HF transformers' Mask2Former modules with the
same weights (converted with ``mpseg.convert``), in the same process, on the same inputs.

Setting (defaults): B=2, a 512x512 input, ResNet-50 channels (256, 512, 1024, 2048) at strides 4-32, so the decoder
reads maps of 16x16, 32x32, 64x64 and predicts masks at 128x128; 100 queries, 9 layers, hidden 256, 8 heads. Reports
the median over ``--reps`` runs of forward (no grad) and forward+backward, and the ratio HF / mpseg (> 1: mpseg is
faster). The outputs are also checked to agree before timing.

    python benchmarks/bench_decoder.py            # full
    python benchmarks/bench_decoder.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from mpseg import available_backends, convert
from mpseg.layers.decoder import MaskedAttentionDecoder
from mpseg.layers.pixel_decoder import MSDeformAttnPixelDecoder

CHANNELS = [256, 512, 1024, 2048]
STRIDES = [4, 8, 16, 32]


def _hf_modules(args):
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerPixelDecoder,
        Mask2FormerTransformerModule,
    )

    config = Mask2FormerConfig(
        feature_size=256, mask_feature_size=256, hidden_dim=256, num_queries=args.queries,
        decoder_layers=args.layers + 1, num_labels=args.classes, feature_strides=STRIDES,
    )
    pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=CHANNELS)
    transformer = Mask2FormerTransformerModule(in_features=256, config=config)
    class_predictor = nn.Linear(256, args.classes + 1)
    with torch.no_grad():  # HF's modules outside a PreTrainedModel keep an uninitialised level_embed
        pixel_decoder.level_embed.normal_()
    return pixel_decoder, transformer, class_predictor


def _hf_state_dict(pixel_decoder, transformer, class_predictor):
    sd = {f"model.pixel_level_module.decoder.{k}": v for k, v in pixel_decoder.state_dict().items()}
    sd.update({f"model.transformer_module.{k}": v for k, v in transformer.state_dict().items()})
    sd.update({f"class_predictor.{k}": v for k, v in class_predictor.state_dict().items()})
    return sd


def _interleaved_medians(fns, reps: int, warmup: int, clock=time.perf_counter) -> list[float]:
    """Median time of each function; runs alternate so slow drifts of a shared machine hit all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, bucket in zip(fns, times):
            start = clock()
            fn()
            bucket.append(clock() - start)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 1 warm-up")
    parser.add_argument(
        "--cpu-time", action="store_true",
        help="time with the process's CPU time instead of wall time (steadier on a shared machine; with --threads 1)",
    )
    parser.add_argument("--skip-pixel-decoder", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    hf_pd, hf_tm, hf_cls = _hf_modules(args)
    pd = MSDeformAttnPixelDecoder(CHANNELS, STRIDES)
    dec = MaskedAttentionDecoder(256, args.classes, num_queries=args.queries, dec_layers=args.layers)
    convert.convert_hf(_hf_state_dict(hf_pd, hf_tm, hf_cls), pixel_decoder=pd, decoder=dec)
    for m in (hf_pd, hf_tm, hf_cls, pd, dec):
        m.eval()

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(args.batch, c, args.size // s, args.size // s, generator=g) for c, s in zip(CHANNELS, STRIDES)]
    with torch.no_grad():
        mask_features, multi_scale = pd(feats)
        hf_out = hf_pd(feats)
        pd_err = (mask_features - hf_out.mask_features).abs().max().item()
        out = dec(multi_scale, mask_features)
        hf_dec = hf_tm(list(multi_scale), mask_features)
        dec_err = (out["pred_masks"] - hf_dec.masks_queries_logits[-1]).abs().max().item()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, msda backends {available_backends()}")
    print(f"agreement before timing: pixel decoder max |diff| {pd_err:.2e}, decoder masks max |diff| {dec_err:.2e}")

    def hf_decoder_forward():
        o = hf_tm(list(multi_scale), mask_features)
        return [hf_cls(h.transpose(0, 1)) for h in o.intermediate_hidden_states], o.masks_queries_logits

    def mp_decoder_forward():
        o = dec(multi_scale, mask_features)
        preds = o["aux_outputs"] + [o]
        return [p["pred_logits"] for p in preds], [p["pred_masks"] for p in preds]

    def backward_of(forward):
        def run():
            logits, masks = forward()
            (sum(x.float().mean() for x in logits) + sum(x.float().mean() for x in masks)).backward()
        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    cases = [
        ("decoder fwd", no_grad(hf_decoder_forward), no_grad(mp_decoder_forward)),
        ("decoder fwd+bwd", backward_of(hf_decoder_forward), backward_of(mp_decoder_forward)),
    ]
    if not args.skip_pixel_decoder:
        feats_grad = [f.clone().requires_grad_(True) for f in feats]

        def hf_pd_fwd_bwd():
            o = hf_pd(feats_grad)
            (o.mask_features.mean() + sum(f.mean() for f in o.multi_scale_features)).backward()

        def mp_pd_fwd_bwd():
            m, ms = pd(feats_grad)
            (m.mean() + sum(f.mean() for f in ms)).backward()

        cases += [
            ("pixel decoder fwd", no_grad(lambda: hf_pd(feats)), no_grad(lambda: pd(feats))),
            ("pixel decoder fwd+bwd", hf_pd_fwd_bwd, mp_pd_fwd_bwd),
        ]

    rows = []
    print(f"\nB={args.batch}, {args.size}x{args.size}, {args.queries} queries, {args.layers} layers, "
          f"median of {args.reps}, {'CPU' if args.cpu_time else 'wall'} time\n")
    print(f"| {'case':<22} | {'HF (ms)':>9} | {'mpseg (ms)':>10} | {'HF / mpseg':>10} |")
    print(f"|{'-' * 24}|{'-' * 11}:|{'-' * 12}:|{'-' * 12}:|")
    for name, hf_fn, mp_fn in cases:
        clock = time.process_time if args.cpu_time else time.perf_counter
        hf_t, mp_t = _interleaved_medians([hf_fn, mp_fn], args.reps, args.warmup, clock)
        rows.append({"case": name, "hf_ms": 1e3 * hf_t, "mpseg_ms": 1e3 * mp_t, "ratio": hf_t / mp_t})
        print(f"| {name:<22} | {1e3 * hf_t:9.1f} | {1e3 * mp_t:10.1f} | {hf_t / mp_t:10.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
