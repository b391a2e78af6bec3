"""Data-parallel training under torchrun (2 CPU processes, gloo) matches one process at the same global batch.

Why the curves can match: the loader shards one shared permutation by rank, so the two per-rank batches
of 32 at step k are exactly the single process's batch of 64, and DDP averages the two per-rank mean
gradients, which is the mean gradient over the 64 samples. The model uses LayerNorm only (a tiny ViT):
BatchNorm would normalise over 32 samples per rank instead of 64 and legitimately change the curve.
What remains is float summation order in the gradient all-reduce; TOLERANCE bounds its effect on the
per-epoch losses (relative), which in practice is around 1e-6.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.train.config import parse_train_config
from services.train.engine import Engine
from services.train.events import read_events
from shared.storage import open_store

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-3

CONFIG = {
    "experiment": "ddp-test",
    "model": {"name": "vit_tiny_patch16_224",
              "kwargs": {"img_size": 28, "patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2}},
    "data": {"kind": "synthetic", "train_size": 1024, "val_size": 256},
    "epochs": 3, "batch_size": 64,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "deterministic": True, "num_threads": 1, "seed": 3,
    "export": {"name": "ddp-model"},
}


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("TRAINYARD_HOME", str(home))
    monkeypatch.setenv("TRAINYARD_PROGRESS", "0")
    monkeypatch.delenv("TRAINYARD_PUSHGATEWAY", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    store_dir = tmp_path / "store"

    single = Engine(parse_train_config(CONFIG), "single", store=open_store(store_dir), tracking=False).run()

    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "TRAINYARD_STORE": f"file://{store_dir}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "services.train.worker", "--run-id", "ddp", "--config", str(config), "--no-tracking"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    events = read_events(home / "runs" / "ddp" / "events.jsonl")
    # Only rank 0 reports: one state sequence, one record per epoch.
    states = [e for e in events if e["type"] == "state"]
    assert [s["state"] for s in states] == ["RUNNING", "SUCCEEDED"] and states[0]["world_size"] == 2
    epochs = [e for e in events if e["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]

    worst = 0.0
    for mine, theirs in zip(single.history, epochs, strict=True):
        for key in ("train_loss", "val_loss"):
            assert theirs["metrics"][key] == pytest.approx(mine[key], rel=TOLERANCE), (key, mine["epoch"])
            worst = max(worst, abs(theirs["metrics"][key] / mine[key] - 1))
        # Accuracies are counts over the same samples: equal unless a logit sits on a rounding knife edge.
        assert abs(theirs["metrics"]["val_acc"] - mine["val_acc"]) <= 2 / 256
    assert single.history[-1]["train_loss"] < single.history[0]["train_loss"]  # it did learn
    print(f"largest relative loss difference, 2 ranks vs 1 process: {worst:.2e}")

    store = open_store(store_dir)
    assert store.is_published("runs/ddp/checkpoints/epoch-0003")
    assert store.is_published("models/ddp-model/2")  # the single run exported version 1
