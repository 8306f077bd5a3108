# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""A whole MP-Former training step (pixel decoder -> noiser -> decoder -> criterion, forward and backward) under
``torch.compile`` and under CPU autocast, compared with the same step in eager float32.

Sizes are tiny: compilation dominates on a CPU, and the properties tested (what is traced, where the graph breaks, which
parts stay in float32) do not depend on them.
"""

import contextlib
import logging
import re

import pytest
import torch

from mpseg import HungarianMatcher, MaskedAttentionDecoder, MaskPilotNoiser, MSDeformAttnPixelDecoder, SetCriterion

# Every test runs on the CPU and, where a GPU is present, on CUDA (the device fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("device")

K = 3  # classes
C = 32  # channels everywhere (GroupNorm needs multiples of 32)



def _blocks(dec_layers=2, seed=0):
    torch.manual_seed(seed)
    pixel_decoder = MSDeformAttnPixelDecoder([C] * 4, [4, 8, 16, 32], conv_dim=C, mask_dim=C, transformer_nheads=4,
                                             transformer_dim_feedforward=64, transformer_enc_layers=1)
    decoder = MaskedAttentionDecoder(C, K, hidden_dim=C, num_queries=6, nheads=4, dim_feedforward=64,
                                     dec_layers=dec_layers, mask_dim=C)
    noiser = MaskPilotNoiser(K, C, point_noise=0.2, label_noise=0.2)
    criterion = SetCriterion(K, HungarianMatcher(num_points=64), num_points=64)
    return pixel_decoder, decoder, noiser, criterion


def _features(seed=1, batch=2, size=64):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    return [torch.randn(batch, C, size // s, size // s, generator=g) for s in (4, 8, 16, 32)]


def _targets(seed=2, counts=(2, 1), size=64):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    out = []
    for n in counts:
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for j in range(n):
            y, x = torch.randint(0, size - 24, (2,), generator=g).tolist()
            masks[j, y:y + 24, x:x + 20] = True
        out.append({"labels": torch.randint(0, K, (n,), generator=g), "masks": masks})
    return out


def _step_fn(pixel_decoder, decoder, noiser, criterion):
    def step(features, targets, generator=None):
        mask_features, multi_scale = pixel_decoder(features)
        pilot = noiser(targets, generator=generator)
        outputs = decoder(multi_scale, mask_features, pilot=pilot)
        losses = criterion(outputs, targets, generator=generator)
        losses["loss"] = losses["loss"] + noiser.dummy_loss()
        return losses

    return step


def _params(*modules):
    return [p for m in modules for p in m.parameters()]


def _run(step, params, features, targets, seed):
    for p in params:
        p.grad = None
    torch.manual_seed(seed)  # generator=None: noise and point draws come from the global RNG
    losses = step(features, targets)
    losses["loss"].backward()
    return {k: v.detach() for k, v in losses.items()}, [p.grad.clone() for p in params]


class _GraphBreaks(logging.Handler):
    """Collects the ``file:line`` of every graph break that Dynamo logs, and the frames it ran uncompiled."""

    def __init__(self):
        super().__init__()
        self.sites, self.skipped = [], []

    def emit(self, record):
        text = record.getMessage()
        self.sites += re.findall(r"[Gg]raph break.* in user code at (\S+):\d+", text)
        self.skipped += re.findall(r"frame skipped: (\S+ \(\S+) line", text)


@contextlib.contextmanager
def _recording_graph_breaks():
    """Fresh Dynamo state with graph-break logging on; yields the :class:`_GraphBreaks` that collects them."""
    breaks = _GraphBreaks()
    logger = logging.getLogger("torch._dynamo")
    torch._dynamo.reset()
    torch._logging.set_logs(graph_breaks=True)
    logger.addHandler(breaks)
    try:
        yield breaks
    finally:
        logger.removeHandler(breaks)
        torch._logging.set_logs()
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    blocks = _blocks()
    params = _params(*blocks)
    step = _step_fn(*blocks)
    features, targets = _features(), _targets()
    optimizer = torch.optim.SGD(params, lr=0.05)

    eager = []
    snapshot = [p.detach().clone() for p in params]
    for seed in (7, 8):  # two steps with an optimizer update between them
        eager.append(_run(step, params, features, targets, seed))
        optimizer.step()
    with torch.no_grad():
        for p, s in zip(params, snapshot):
            p.copy_(s)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        # aot_eager: Dynamo's capture and AOTAutograd's forward/backward graphs (what torch.compile changes), run by
        # the eager kernels, so compiled and eager agree to rounding and the test compiles in seconds, not minutes.
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    with _recording_graph_breaks() as breaks:
        compiled = torch.compile(step, backend=backend)
        for i, seed in enumerate((7, 8)):
            before = len(graphs)
            losses, grads = _run(compiled, params, features, targets, seed)
            if i == 1:
                assert len(graphs) == before, "the second step (same shapes, updated weights) recompiled"
            ref_losses, ref_grads = eager[i]
            assert losses.keys() == ref_losses.keys()
            for key in ref_losses:
                torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-5, atol=1e-6, msg=key)
            for g, r in zip(grads, ref_grads):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
            optimizer.step()

    # The whole step is one graph: nothing breaks in the pixel decoder, noiser (its label-range check is skipped while
    # compiling), decoder, matcher (SciPy runs inside the custom op torch.ops.mpseg.linear_sum_assignment) or criterion
    # (the pilot assignment follows from MaskPilot's layout).
    assert breaks.sites == [], breaks.sites
    assert breaks.skipped == [], breaks.skipped
    assert len(graphs) == 1, len(graphs)


@pytest.mark.cpu_only  # about a log format, not a device
def test_graph_break_log_is_understood():
    # The compiled-step test reads graph-break sites from Dynamo's log; make sure it would see one.
    def f(x):
        y = x * 2
        if y.sum().item() > 0:  # data-dependent branch: a graph break
            return y + 1
        return y - 1

    with _recording_graph_breaks() as breaks:
        torch.compile(f, backend="eager")(torch.ones(3))
    assert breaks.sites and all(site.endswith("test_training_step.py") for site in breaks.sites), breaks.sites


def test_matcher_compiles_without_graph_break():
    matcher = HungarianMatcher(num_points=64)
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 5, K + 1, generator=g),
               "pred_masks": torch.randn(2, 5, 16, 16, generator=g)}
    targets = _targets(counts=(3, 0), size=32)
    torch.manual_seed(3)
    expected = matcher(outputs, targets)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(matcher, backend="eager", fullgraph=True)  # fullgraph: any break is an error
        torch.manual_seed(3)
        actual = compiled(outputs, targets)
    finally:
        torch._dynamo.reset()
    assert len(actual) == 2
    for (p, t), (pe, te) in zip(actual, expected):
        assert torch.equal(p, pe) and torch.equal(t, te)
    assert actual[0][0].numel() == 3 and actual[1][0].numel() == 0


@pytest.mark.cpu_only  # the assignment op takes CPU cost matrices
def test_assignment_op_registration_and_values():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0], [0.5, 9.0, 9.0]])
    torch.library.opcheck(torch.ops.mpseg.linear_sum_assignment, (cost, "replace", 0))
    rows, cols = torch.ops.mpseg.linear_sum_assignment(cost, "replace", 0)
    # Optimum by hand: row 3 -> col 0 (0.5), row 1 -> col 1 (0), row 2 -> col 2 (2); total 2.5.
    assert rows.tolist() == [1, 2, 3] and cols.tolist() == [1, 2, 0]
    rows, cols = torch.ops.mpseg.linear_sum_assignment(cost.t().contiguous(), "replace", 0)  # wide: min(Q, T) pairs
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [3, 1, 2]
    bad = cost.clone()
    bad[1, 1] = float("nan")
    rows, cols = torch.ops.mpseg.linear_sum_assignment(bad, "replace", 0)
    assert (1, 1) not in set(zip(rows.tolist(), cols.tolist()))
    with pytest.raises(ValueError, match="image 4 is NaN or inf for prediction.*\\[1\\]"):
        torch.ops.mpseg.linear_sum_assignment(bad, "raise", 4)
    empty_rows, empty_cols = torch.ops.mpseg.linear_sum_assignment(torch.zeros(5, 0), "replace", 0)
    assert empty_rows.shape == (0,) and empty_cols.dtype == torch.int64


@pytest.mark.cpu_only  # about graph breaks around host code (.numpy())
def test_run_eagerly_is_one_break_with_the_function_uncompiled():
    from mpseg.training._eager import run_eagerly

    calls = []

    def host(x):  # three things Dynamo cannot trace; called through run_eagerly they cost one break together
        calls.append(torch.compiler.is_compiling())
        n = int(x.sum().item())
        return torch.as_tensor(x.numpy().cumsum()[:n].copy())

    def f(x):
        return run_eagerly(host, x * 1.0) + 1

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        out = torch.compile(f, backend=backend)(torch.ones(3))
    finally:
        torch._dynamo.reset()
    assert out.tolist() == [2.0, 3.0, 4.0] and calls == [False]
    assert len(graphs) == 2  # before and after the call


@pytest.mark.cpu_only  # on a GPU: a device-side assertion, which ends the CUDA context
def test_pilot_assignment_from_layout_equals_target_index_path():
    targets = _targets(counts=(2, 0, 1))
    pilot = MaskPilotNoiser(K, C, num_groups=2)(targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    criterion = SetCriterion(K, HungarianMatcher(num_points=16), num_points=16)
    batch, num_pilots = pilot.target_index.shape
    general = {"pred_logits": torch.zeros(batch, num_pilots, K + 1), "pred_masks": torch.zeros(batch, num_pilots, 4, 4),
               "target_index": pilot.target_index, "num_groups": pilot.num_groups}
    layout = dict(general, max_objects=pilot.max_objects)
    (from_data, groups_a), (from_layout, groups_b) = (criterion.pilot_assignment(o, targets) for o in (general, layout))
    assert groups_a == groups_b == 2.0
    for (slots_a, gt_a), (slots_b, gt_b) in zip(from_data, from_layout):
        assert torch.equal(slots_a, slots_b) and torch.equal(gt_a, gt_b)
    # By hand: max_objects = 2, slots g * 2 + j.
    assert [s.tolist() for s, _ in from_layout] == [[0, 1, 2, 3], [], [0, 2]]
    assert [t.tolist() for _, t in from_layout] == [[0, 1, 0, 1], [], [0, 0]]
    # A target_index that does not follow the layout it claims is caught in eager mode.
    broken = dict(layout, target_index=pilot.target_index.flip(1))
    with pytest.raises(ValueError, match="does not follow the group-major layout"):
        criterion.pilot_assignment(broken, targets)
    with pytest.raises(ValueError, match="claims num_groups=2 groups of max_objects=1 slots"):
        criterion.pilot_assignment(dict(layout, max_objects=1), targets)


# ---------------------------------------------------------------------------------------------------------- autocast

def _autocast_step(dtype, seed=3):
    """One step under CPU autocast (dtype None: plain float32), recording the dtypes inside it."""
    pixel_decoder, decoder, noiser, criterion = blocks = _blocks(dec_layers=3)
    params = _params(*blocks)
    seen = {}
    matcher_costs = criterion.matcher.cost_matrices

    def spy(*args, **kwargs):
        costs = matcher_costs(*args, **kwargs)
        seen.setdefault("cost", set()).update(c.dtype for c in costs)
        return costs

    criterion.matcher.cost_matrices = spy
    torch.manual_seed(seed)
    with torch.autocast(torch.get_default_device().type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        mask_features, multi_scale = pixel_decoder(_features())
        targets = _targets()
        outputs = decoder(multi_scale, mask_features, pilot=noiser(targets))
        losses = criterion(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(seed))
    losses["loss"].backward()
    seen["pixel_decoder"] = {mask_features.dtype} | {f.dtype for f in multi_scale}
    seen["decoder"] = {outputs["pred_logits"].dtype, outputs["pred_masks"].dtype}
    seen["losses"] = {v.dtype for v in losses.values()}
    grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    return losses, grads, outputs, targets, criterion, seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_step_is_finite_and_close_to_float32(dtype):
    ref, ref_grads, *_ = _autocast_step(None)
    losses, grads, outputs, targets, criterion, seen = _autocast_step(dtype)
    # Autocast really ran the decoder in low precision (else this test would compare float32 with itself) ...
    assert seen["decoder"] == {dtype}
    # ... while the float32 islands held: pixel decoder (deformable encoder), matching costs, every loss.
    assert seen["pixel_decoder"] == {torch.float32}
    assert seen["cost"] == {torch.float32}
    assert seen["losses"] == {torch.float32}
    assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(grads).all()
    # Tolerances. Measured here: total loss relative error 7e-5 (bf16) / 3e-5 (fp16); worst single term 0.10% / 0.14%;
    # gradient relative error (all parameters, L2) 1.1% / 0.75%, cosine 0.99994 / 0.99997. Bounds leave ~4-10x.
    torch.testing.assert_close(losses["loss"], ref["loss"], rtol=1e-3, atol=0)
    for key in ref:
        torch.testing.assert_close(losses[key], ref[key], rtol=1e-2, atol=1e-3, msg=key)
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) > 0.999
    assert (grads - ref_grads).norm() / ref_grads.norm() < 0.05


def test_criterion_computes_in_float32_from_half_outputs():
    # The criterion (matching costs, class loss, sigmoid-CE and dice on sampled points) must give, from bf16 outputs
    # under autocast, the losses of the same outputs cast to float32 outside autocast: only then is it a float32
    # island rather than bf16 arithmetic that happens to return float32.
    *_, outputs, targets, criterion, _ = _autocast_step(torch.bfloat16)
    outputs = {k: v for k, v in outputs.items()}
    with torch.no_grad(), torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16):
        under = criterion(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(11))

    def to_float(x):
        if isinstance(x, torch.Tensor):
            return x.float() if x.is_floating_point() else x
        if isinstance(x, dict):
            return {k: to_float(v) for k, v in x.items()}
        if isinstance(x, list):
            return [to_float(v) for v in x]
        return x

    with torch.no_grad():
        plain = criterion(to_float(outputs), targets, generator=torch.Generator(torch.get_default_device()).manual_seed(11))
    assert under.keys() == plain.keys() and any("_mp" in k for k in plain)
    for key in plain:
        torch.testing.assert_close(under[key], plain[key], rtol=1e-6, atol=1e-6, msg=key)


def test_grad_scaler_fp16_step_updates_finite_weights():
    pixel_decoder, decoder, noiser, criterion = blocks = _blocks()
    params = _params(*blocks)
    optimizer = torch.optim.SGD(params, lr=0.05)
    scaler = torch.amp.GradScaler(torch.get_default_device().type, init_scale=2.0**10)
    before = [p.detach().clone() for p in params]
    targets = _targets()
    with torch.autocast(torch.get_default_device().type, dtype=torch.float16):
        mask_features, multi_scale = pixel_decoder(_features())
        outputs = decoder(multi_scale, mask_features, pilot=noiser(targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0)))
        loss = criterion(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))["loss"] + noiser.dummy_loss()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**10  # no inf/NaN gradient: the step was taken and the scale kept
    assert all(torch.isfinite(p).all() for p in params)
    assert sum(not torch.equal(a, b) for a, b in zip(before, params)) > len(params) // 2
