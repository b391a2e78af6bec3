"""Render 10,000 trajectory samples with 2 workers and compare with the reference log.

The experiment log this platform replaces took 448 s and 14 GB for the same dataset (and died
at 92 % on a full disk). Prints seconds, size on disk and the ratios to those figures.

    .venv/bin/python bench/bench_trajectories.py [--total 10000] [--workers 2] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.render.shards import run_sharded  # noqa: E402
from services.render.trajectories import TrajectoryJob  # noqa: E402
from shared.storage import open_store  # noqa: E402

LOG_SECONDS = 448.0
LOG_BYTES = 14e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--total", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--keep", help="render into this directory and keep it (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-traj-") as tmp:
        root = Path(args.keep or tmp)
        store = open_store(root)
        job = TrajectoryJob(total=args.total, shard_size=args.shard_size, seed=0)
        t0 = time.perf_counter()
        manifest = run_sharded(job, store, "bench/trajectories", workers=args.workers)
        seconds = time.perf_counter() - t0
        on_disk = sum(p.stat().st_blocks * 512 for p in (root / "bench/trajectories").rglob("*") if p.is_file())
    # The log's figures are for 10,000 samples; scale when a different total is rendered.
    scale = args.total / 10_000
    print(json.dumps({
        "samples": args.total,
        "workers": args.workers,
        "seconds": round(seconds, 2),
        "samples_per_s": round(args.total / seconds, 1),
        "bytes_on_disk": on_disk,
        "gb_on_disk": round(on_disk / 1e9, 3),
        "bytes_per_sample": round(manifest.total_size / args.total),
        "time_ratio_vs_log_448s": round(seconds / (LOG_SECONDS * scale), 4),
        "size_ratio_vs_log_14GB": round(on_disk / (LOG_BYTES * scale), 4),
        "speedup_vs_log": round(LOG_SECONDS * scale / seconds, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
