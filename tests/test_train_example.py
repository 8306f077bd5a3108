# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""examples/train.py as users launch it: a 2-process gloo torchrun job on a tiny COCO-format panoptic dataset written
to disk, evaluated across both ranks, then resumed from its checkpoint; and one plain-python instance run."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from make_tiny_coco import write_tiny_coco  # noqa: E402

# A model small enough for CI: 64 px crops (the smallest whose stride-32 map has more than one pixel, which
# GroupNorm needs), 32 channels, 2 decoder layers, 8 queries, 64 points.
TINY = ["--backbone", "resnet10t", "--hidden-dim", "32", "--nheads", "2", "--num-queries", "8", "--dec-layers", "2",
        "--enc-layers", "1", "--points", "64", "--crop-size", "64", "--min-scale", "1.0", "--eval-size", "0",
        "--batch-size", "1", "--workers", "0", "--threads", "1", "--no-progress", "--log-every", "1"]


def _run(args, env_extra=None, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    result = subprocess.run(launcher + [os.path.join(ROOT, "examples", "train.py")] + args, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_tiny_coco(str(root), num_images=4, image_size=64, seed=3)
    return root


@pytest.mark.slow
def test_torchrun_two_ranks_then_resume(tiny_coco, tmp_path):
    data = ["--task", "panoptic", "--train-images", str(tiny_coco / "images"),
            "--train-annotations", str(tiny_coco / "annotations" / "panoptic.json"),
            "--train-panoptic", str(tiny_coco / "annotations" / "panoptic"),
            "--val-images", str(tiny_coco / "images"),
            "--val-annotations", str(tiny_coco / "annotations" / "panoptic.json"),
            "--val-panoptic", str(tiny_coco / "annotations" / "panoptic")]
    out = str(tmp_path / "run")
    common = data + TINY + ["--out", out, "--mask-pilot", "--eval-every", "3", "--checkpoint-every", "3"]
    stdout = _run(common + ["--steps", "6"], nproc=2)
    assert "2 process(es) on cpu" in stdout
    state = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=False)
    assert state["step"] == 6
    first = _log(out)
    assert [e["step"] for e in first if "loss" in e] == [1, 2, 3, 4, 5, 6]
    evals = [e for e in first if "eval" in e]
    assert [e["step"] for e in evals] == [3, 6]
    assert {"pq", "pq_th", "pq_st", "miou", "mask_ap"} <= set(evals[-1]["eval"])
    # The two ranks evaluated disjoint halves of the 5 validation images: the panoptic counts cover all of them.
    assert all(0.0 <= e["eval"]["miou"] <= 100.0 for e in evals)
    assert os.path.exists(os.path.join(out, "curves.png"))
    saved_lr = state["schedule"]["last_epoch"]

    # Resume: continues at step 7 with the saved optimiser and schedule, up to the new total.
    stdout = _run(common + ["--steps", "8", "--resume"], nproc=2)
    assert "resumed from" in stdout and "at step 6" in stdout
    resumed = _log(out)[len(first):]
    assert [e["step"] for e in resumed if "loss" in e] == [7, 8]
    state = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=False)
    assert state["step"] == 8 and state["schedule"]["last_epoch"] == saved_lr + 2
    assert [e["step"] for e in state["history"] if "eval" in e] == [3, 6, 8]


@pytest.mark.slow
def test_plain_python_instance_run(tiny_coco, tmp_path):
    annotations = str(tiny_coco / "annotations" / "instances.json")
    out = str(tmp_path / "run")
    _run(["--task", "instance", "--train-images", str(tiny_coco / "images"), "--train-annotations", annotations,
          "--val-images", str(tiny_coco / "images"), "--val-annotations", annotations, "--steps", "2",
          "--eval-every", "2", "--out", out] + TINY)
    log = _log(out)
    assert [e["step"] for e in log if "loss" in e] == [1, 2]
    metrics = [e for e in log if "eval" in e][-1]["eval"]
    assert set(metrics) == {"mask_ap", "mask_ap50", "mask_ap75", "mask_aps", "mask_apm", "mask_apl"}
    assert 0.0 <= metrics["mask_ap"] <= 100.0
