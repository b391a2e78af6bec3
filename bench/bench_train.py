"""Training throughput of the platform vs a bare PyTorch loop, and the per-epoch logging/checkpoint cost.

    .venv/bin/python bench/bench_train.py [--batch-sizes 64 256] [--train-size 60000] [--epochs 2] [--rounds 4]
                                          [--recipe default|full] [--quick]

Both sides train mnist_ultralight (the reference architecture, SGD lr 0.01 momentum 0.9) on the same
in-memory data, in the same process with the same thread count, alternating bare/platform per round so
background load hits both alike. The bare loop indexes pre-normalised float tensors with a randperm; the
platform is the real Engine: InMemoryLoader (uint8 -> normalised float per batch), on-device metric
accumulation, per-epoch validation, checkpoints to a local store, events, and MLflow (local sqlite).
Targets: train throughput >= 90% of the bare loop; checkpoint + logging <= 2% of epoch time.

``--recipe full`` turns on what an honest run adds on the platform side: EMA of the weights (updated every
step, evaluated instead of the raw weights), temperature calibration fitted on validation after training, and
the per-epoch evaluation of a fixed training sample (data.train_eval_size, spelled out; the default recipe has
it too, at the same default size). Two ratios are printed: "train" (the fastest epoch's training phase, the
target's figure) and "run" (the whole run's wall time from the first epoch to the end of the final
test/calibration pass, per-epoch evaluation, checkpoints and logging included, against the bare loop's
training time for the same epochs). "finish s" (logging the model and figures to MLflow) is shown apart.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loops import bare_loop  # noqa: E402
from services.train.config import parse_train_config  # noqa: E402
from services.train.engine import Engine  # noqa: E402
from shared.data import synthetic_digits  # noqa: E402
from shared.models import create_model  # noqa: E402
from shared.storage import open_store  # noqa: E402


def bare_mnist(x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int, seed: int = 0) -> float:
    """The fastest honest bare loop: the best of per-batch gathers and one whole-epoch gather with slices
    (which one wins depends on the batch size and the machine; a baseline the platform beats is no baseline)."""
    rates = []
    for whole_epoch in (False, True):
        torch.manual_seed(seed)
        model = create_model("mnist_ultralight")
        rates.append(bare_loop(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), x, y, batch_size,
                               epochs, whole_epoch=whole_epoch))
    return max(rates)


RECIPES = {
    "default": {},
    "full": {"ema": {"enabled": True}, "calibration": {"temperature": True}, "data": {"train_eval_size": 5000}},
}


def platform(home: Path, train_size: int, batch_size: int, epochs: int, run_id: str,
             recipe: str = "default") -> dict[str, float]:
    extra = RECIPES[recipe]
    cfg = parse_train_config({
        "experiment": "bench-train", "model": {"name": "mnist_ultralight"},
        "data": {"kind": "synthetic", "train_size": train_size, "val_size": 2000, "test_size": 2000,
                 **extra.get("data", {})},
        "epochs": epochs, "batch_size": batch_size,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "scheduler": {"name": "step", "step_size": 10, "gamma": 0.1},
        "export": {"enabled": False},
        **{k: v for k, v in extra.items() if k != "data"},
    })
    engine = Engine(cfg, run_id, store=open_store(home / "artifacts"),
                    tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    result = engine.run()
    rows = result.timings
    fastest = min(rows, key=lambda r: r["train"])
    epoch_total = [r["train"] + r["eval"] + r["overhead"] for r in rows]
    overhead = [r["checkpoint_and_logging"] / t for r, t in zip(rows, epoch_total, strict=True)]
    final = result.final_timings
    return {"samples_per_second": train_size / fastest["train"],
            "run_s": sum(epoch_total) + final["evaluation"], "final_s": final["evaluation"],
            "finish_s": final["finish"],
            "overhead_pct": 100 * statistics.median(overhead),
            "overhead_s": statistics.median(r["checkpoint_and_logging"] for r in rows),
            "epoch_s": statistics.median(epoch_total)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--train-size", type=int, default=60000, help="samples per epoch (MNIST has 60000)")
    p.add_argument("--epochs", type=int, default=2)
    # Best of 4 rounds a side: with 2, one slow bare round on this shared 2-core VM put the platform at
    # 112.8% of the bare loop (4,127 vs 4,655 samples/s); 4 rounds gave 100.5% (4,810 vs 4,832).
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                   help="full: EMA, temperature calibration and the training-sample evaluation on the platform side")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2000 samples, 1 epoch, 1 round, batch 64")
    args = p.parse_args()
    if args.quick:
        args.train_size, args.epochs, args.rounds, args.batch_sizes = 2000, 1, 1, [64]
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["TRAINYARD_PROGRESS"] = "0"
    os.environ.pop("TRAINYARD_PUSHGATEWAY", None)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["TRAINYARD_HOME"] = str(home)
        # The same samples the Engine's synthetic kind generates, normalised once for the bare loop.
        x_u8, y = synthetic_digits(args.train_size, seed=0)
        x = (x_u8.float() / 255 - 0.1307) / 0.3081
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.train_size} samples/epoch, "
              f"mnist_ultralight, {args.epochs} epochs x {args.rounds} rounds per side, recipe {args.recipe}")
        print(f"{'batch':>6} {'bare sps':>10} {'platform sps':>13} {'train':>7} {'run':>7} {'final s':>8} "
              f"{'finish s':>9} {'ckpt+log s':>11} {'epoch s':>8} {'overhead':>9}")
        ok = True
        for bs in args.batch_sizes:
            bare, plat = [], []
            for r in range(args.rounds):
                bare.append(bare_mnist(x, y, bs, args.epochs))
                plat.append(platform(home, args.train_size, bs, args.epochs, f"bench-{bs}-{r}", args.recipe))
            b = max(bare)
            best = max(plat, key=lambda d: d["samples_per_second"])
            ratio = best["samples_per_second"] / b
            # The whole run against the bare loop training the same epochs at its best rate.
            run_ratio = args.epochs * args.train_size / b / min(d["run_s"] for d in plat)
            overhead = statistics.median(d["overhead_pct"] for d in plat)
            ok &= ratio >= 0.9 and overhead <= 2.0
            print(f"{bs:>6} {b:>10.0f} {best['samples_per_second']:>13.0f} {ratio:>6.1%} {run_ratio:>6.1%} "
                  f"{statistics.median(d['final_s'] for d in plat):>8.2f} "
                  f"{statistics.median(d['finish_s'] for d in plat):>9.2f} "
                  f"{statistics.median(d['overhead_s'] for d in plat):>11.3f} "
                  f"{statistics.median(d['epoch_s'] for d in plat):>8.2f} {overhead:>8.2f}%")
        print("train: fastest training phase; run: first epoch to the end of the final test/calibration pass")
        print("targets (train ratio >= 90%, overhead <= 2%):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
