"""Trajectory video models: shard streaming against training, and each extractor's training throughput
through the platform against a bare PyTorch loop over the same tensors.

    .venv/bin/python bench/bench_video.py [--clips 1200] [--epochs 2] [--models traj_i3d ...]

Renders a small trajectory dataset (shards of 100 clips; the dataset's seed gives 10% validation and 10%
test shards), then:
- streaming: the training batches the TrajectoryTask builds (shards fetched, sha256-verified, decompressed
  and subsampled, shuffle buffer, batches of 32; in a background thread, or 1 or 2 worker processes),
  drained with no model, in samples/s; target >= 5x the training throughput of the fastest extractor;
- per extractor, alternately: the bare loop (the training split decoded once into pre-normalised float
  tensors in memory, shuffled mini-batches gathered one ahead in a thread, the same multi-task loss and
  optimiser, nothing else) and the
  real Engine (streaming from the shards in a background thread, on-device metrics, per-epoch validation,
  checkpoints), both on one thread; each side's best epoch counts. Target: platform >= 90% of bare.
  The platform's best epoch is a later one, read from the in-memory copy of the training split that the
  first epoch keeps when it fits data.cache_mb (1,200 clips do); a dataset larger than that streams every
  epoch, which ``first_epoch_vs_bare`` shows (decompressing and subsampling on the same two cores).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loops import bare_loop  # noqa: E402
from services.render.shards import run_sharded  # noqa: E402
from services.render.trajectories import TrajectoryJob  # noqa: E402
from services.train.config import parse_train_config  # noqa: E402
from services.train.engine import Engine  # noqa: E402
from services.train.engine.distributed import DistInfo  # noqa: E402
from services.train.engine.optim import build_optimizer  # noqa: E402
from services.train.engine.tasks import Runtime, build_task  # noqa: E402
from shared.models import create_model  # noqa: E402
from shared.storage import open_store  # noqa: E402

EXTRACTORS = ["traj_i3d", "traj_slowfast", "traj_transformer", "traj_magvit"]


def config(data: Path, model: str, epochs: int, workers: int = 0, cache_mb: int = 1024):
    return parse_train_config({
        "experiment": "bench-video", "task": "trajectory", "model": {"name": model},
        "data": {"kind": "trajectories", "path": str(data), "workers": workers, "train_eval_size": 64,
                 "cache_mb": cache_mb},
        "epochs": epochs, "batch_size": 32, "num_threads": 1,
        "optimizer": {"name": "adamw", "lr": 0.004, "weight_decay": 0.05},
        "scheduler": {"name": "cosine", "warmup_steps": 20}, "export": {"enabled": False}})


def loaded_task(cfg, home: Path):
    task = build_task(cfg, Runtime(torch.device("cpu"), DistInfo(), False, home))
    task.load()
    model = create_model(cfg.model.name, **task.model_kwargs())
    task.attach(model)
    return task, model


def streaming(data: Path, home: Path, workers: int) -> float:
    """Samples/s of the training DataLoader alone (one epoch, after a warm-up epoch)."""
    task, _ = loaded_task(config(data, "traj_i3d", 1, workers, cache_mb=0), home)  # every epoch from the shards
    batches = task.train_batches()
    batches.prepare = lambda batch: batch  # the reading alone: normalising is the model's input step
    best = 0.0
    for epoch in (1, 2):
        batches.set_epoch(epoch)
        n, t0 = 0, time.perf_counter()
        for batch in batches:
            n += len(batch["label"])
        best = max(best, n / (time.perf_counter() - t0))
    return best


def in_memory(task) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training split, decoded once: pre-normalised float clips, labels, targets."""
    clips, labels, targets = [], [], []
    for batch in task.train_batches():
        clips.append(batch["x"])
        labels.append(batch["label"])
        targets.append(batch["future_position"])
    return torch.cat(clips), torch.cat(labels), torch.cat(targets)


def bare(cfg, task, tensors, epochs: int) -> float:
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **task.model_kwargs())
    mean, std = torch.tensor(task.target_mean), torch.tensor(task.target_std)

    def loss_fn(out, t):
        labels, target = t
        return (F.cross_entropy(out["logits"], labels)
                + F.mse_loss((out["future_position"] - mean) / std, (target - mean) / std) + out["aux_loss"])

    x, labels, target = tensors
    return bare_loop(model, build_optimizer(cfg, model), x, (labels, target), cfg.batch_size, epochs, loss_fn,
                     ahead=True)


def platform(cfg, store, run_id: str) -> tuple[float, float]:
    """Samples/s of the Engine's first epoch (streamed from the shards) and its best (from memory, once the
    split fits data.cache_mb), each the trained samples over the epoch's training time."""
    result = Engine(cfg, run_id, store=store, tracking=False).run()
    return result.history[0]["samples_per_second"], max(h["samples_per_second"] for h in result.history)


def _loader(workers: int) -> str:
    return f"{workers} worker processes" if workers else "2 background threads (workers=0, the CPU default)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=EXTRACTORS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        root = Path(tmp)
        run_sharded(TrajectoryJob(total=args.clips, shard_size=100, seed=1), open_store(root / "data"), "clips",
                    workers=2)
        data, home = root / "data" / "clips", root / "home"
        stream = {w: streaming(data, home, w) for w in (0, 1, 2)}
        rows = {}
        for name in args.models:
            cfg = config(data, name, args.epochs)
            task, _ = loaded_task(cfg, home)
            tensors = in_memory(task)
            bare_sps = bare(cfg, task, tensors, args.epochs)
            first, plat_sps = platform(cfg, open_store(root / f"store-{name}"), f"bench-{name.replace('_', '-')}")
            rows[name] = {"bare_samples_per_s": round(bare_sps, 1), "platform_samples_per_s": round(plat_sps, 1),
                          "platform_vs_bare": round(plat_sps / bare_sps, 3),
                          "platform_first_epoch_samples_per_s": round(first, 1),
                          "first_epoch_vs_bare": round(first / bare_sps, 3), "train_samples": len(tensors[1])}
            del tensors
    fastest = max(r["platform_samples_per_s"] for r in rows.values())
    print(json.dumps({
        "streaming_samples_per_s": {_loader(w): round(v, 1) for w, v in stream.items()},
        "extractors": rows,
        "fastest_extractor_samples_per_s": fastest,
        "streaming_vs_fastest_training": {_loader(w): round(v / fastest, 2) for w, v in stream.items()},
        "targets": {"streaming_vs_fastest_training": ">= 5", "platform_vs_bare": ">= 0.90"},
    }, indent=1))


if __name__ == "__main__":
    main()
