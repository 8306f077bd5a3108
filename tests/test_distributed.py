# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Two gloo processes on CPU train a tiny model with DistributedDataParallel: losses and gradients must equal those
of one process seeing the whole batch."""

import datetime
import importlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mpseg import HungarianMatcher, SetCriterion

K, Q, C, SIZE = 4, 6, 8, 10
COUNTS = (3, 1, 2, 0)  # rank 0 sees 4 targets, rank 1 sees 2 (one image empty): num_masks averages to 3
# eos_coef = 1 makes loss_ce an unweighted mean, so its rank average equals the whole-batch value (see the docs);
# pilot padding slots depend on the per-rank maximum, so the pilot class loss is left out of `loss`.
CRITERION_KWARGS = dict(
    eos_coef=1.0, num_points=20, weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_ce_mp": 0.0}
)


def use_fixed_points(patch=setattr):
    """Point draws made independent of call order (one fixed set), so that a rank that sees half the batch samples
    the same points for a mask as the single process does; the test then isolates the reduction over ranks."""

    def fixed(num_sets, num_points, *, device=None, generator=None):
        base = torch.rand(1, num_points, 2, generator=torch.Generator().manual_seed(num_points))
        return base.expand(num_sets, -1, -1).clone().to(device)

    # The submodules, not the function that mpseg.ops re-exports under the name point_sample.
    patch(importlib.import_module("mpseg.ops.point_sampling"), "uniform_points", fixed)
    patch(importlib.import_module("mpseg.training.matcher"), "uniform_points", fixed)


class TinySegmenter(nn.Module):
    """Queries read an image feature map; a pilot query is the embedding of its target's label (MP-Former style)."""

    def __init__(self):
        super().__init__()
        self.pixel = nn.Conv2d(3, C, 1)
        self.query = nn.Parameter(torch.randn(Q, C))
        self.label_enc = nn.Embedding(K, C)
        self.cls = nn.Linear(C, K + 1)
        self.cls_aux = nn.Linear(C, K + 1)

    def predict(self, queries, features, head):
        return {"pred_logits": head(queries + features.mean((2, 3)).unsqueeze(1)),
                "pred_masks": torch.einsum("bqc,bchw->bqhw", queries, features)}

    def forward(self, images, targets):
        features = self.pixel(images)
        queries = self.query.expand(images.shape[0], -1, -1)
        outputs = self.predict(queries, features, self.cls)
        outputs["aux_outputs"] = [self.predict(0.5 * queries, features, self.cls_aux)]
        max_objects = max(len(t["labels"]) for t in targets)
        target_index = torch.full((len(targets), max_objects), -1, dtype=torch.int64)
        pilot_queries = torch.zeros(len(targets), max_objects, C)
        for b, t in enumerate(targets):
            n = len(t["labels"])
            target_index[b, :n] = torch.arange(n)
            pilot_queries[b, :n] = self.label_enc(t["labels"])
        outputs["pilot_outputs"] = {**self.predict(pilot_queries, features, self.cls), "target_index": target_index,
                                    "num_groups": 1, "aux_outputs": []}
        return outputs


def make_data():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(COUNTS), 3, SIZE, SIZE, generator=g)
    targets = [
        {
            "labels": torch.randint(0, K, (n,), generator=g),
            "masks": torch.rand(n, 2 * SIZE, 2 * SIZE, generator=g) > 0.5,
        }
        for n in COUNTS
    ]
    return images, targets


def step(model, images, targets):
    criterion = SetCriterion(K, HungarianMatcher(num_points=20), **CRITERION_KWARGS)
    losses = criterion(model(images, targets), targets)
    losses["loss"].backward()
    return {k: v.detach() for k, v in losses.items()}


def _worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    use_fixed_points()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(TinySegmenter())
        images, targets = make_data()
        half = len(COUNTS) // world_size
        part = slice(rank * half, (rank + 1) * half)

        class Unwrap(nn.Module):  # DDP's forward takes the model's arguments
            def __call__(self, images, targets):
                return model(images, targets)

        losses = step(Unwrap(), images[part], targets[part])
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        torch.save({"losses": losses, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears down while another still uses the connections (gloo aborts then)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path, monkeypatch):
    world_size = 2
    mp.spawn(_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    use_fixed_points(monkeypatch.setattr)  # undone after the test
    torch.manual_seed(0)
    model = TinySegmenter()
    images, targets = make_data()
    single = step(model, images, targets)

    # Every loss in `loss` averages over ranks to the whole-batch value; that needs num_masks = 6 / 2 on both ranks
    # (rank-local counts 4 and 2 would give different values).
    compared = [k for k in single if k != "loss_ce_mp"]
    assert {"loss", "loss_mask", "loss_dice_0", "loss_mask_mp", "loss_dice_mp"} <= set(compared)
    for key in compared:
        mean = sum(r["losses"][key] for r in ranks) / world_size
        torch.testing.assert_close(mean, single[key], rtol=1e-5, atol=1e-6, msg=key)
    assert float(single["loss_mask"]) > 0 and float(single["loss_mask_mp"]) > 0
    for name, p in model.named_parameters():
        for r in ranks:  # DDP averaged the gradients: identical on both ranks and equal to the single process
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
