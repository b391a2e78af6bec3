"""Does the in-memory loader keep up with training? Loader vs resnet50 training throughput at 32x32.

Both are measured in the same process on the same device and threads: resnet50 (timm, 10 classes)
SGD train steps at batch 128 on 32x32 inputs, and InMemoryLoader batches of a CIFAR-size uint8 dataset
with augmentation and normalisation. The loader must sustain ``--min-ratio`` (5x) the training rate.

    .venv/bin/python bench/bench_loader.py [--device cpu|cuda] [--preset cifar_strong] [--steps 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.data import NORMALIZATION, AugmentConfig, InMemoryDataset, InMemoryLoader  # noqa: E402
from shared.models import create_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(device: torch.device, batch: int, steps: int) -> float:
    model = create_model("resnet50", num_classes=10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # warm-up: allocator, cuDNN / oneDNN kernel choice
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def loader_throughput(device: torch.device, batch: int, n: int, preset: str, min_seconds: float) -> float:
    g = torch.Generator().manual_seed(0)
    data = InMemoryDataset(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                           torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)], "synthetic")
    mean, std = NORMALIZATION["cifar10"]
    loader = InMemoryLoader(data, batch, shuffle=True, augment=AugmentConfig.preset(preset), seed=0,
                            drop_last=True, mean=mean, std=std, device=device)
    next(iter(loader))  # warm-up
    _sync(device)
    samples, epoch, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        loader.set_epoch(epoch)
        for x, _ in loader:
            samples += x.shape[0]
            if time.perf_counter() - start >= min_seconds:
                break
        epoch += 1
    _sync(device)
    return samples / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed resnet50 train steps")
    ap.add_argument("--samples", type=int, default=10_000, help="synthetic dataset size for the loader")
    ap.add_argument("--preset", default="cifar_strong", help="augmentation preset the loader applies")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="time the loader at least this long")
    ap.add_argument("--min-ratio", type=float, default=5.0)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    train = train_throughput(device, args.batch, args.steps)
    load = loader_throughput(device, args.batch, args.samples, args.preset, args.min_seconds)
    ratio = load / train
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} input=3x32x32")
    print(f"{'resnet50 train step':<34}{train:>12,.0f} samples/s")
    print(f"{'loader (' + args.preset + ' augment)':<34}{load:>12,.0f} samples/s")
    verdict = "OK" if ratio >= args.min_ratio else "TOO SLOW"
    print(f"{'ratio loader/train':<34}{ratio:>12.1f}x  (need >= {args.min_ratio:g}x: {verdict})")
    return 0 if ratio >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
