"""GMACs and parameter counts of the 7 backbone-study models at 3x224x224, 1000 classes, vs published figures.

Run: ``.venv/bin/python -m bench.bench_flops``. Exits non-zero when a model misses the 3% bar, so the
table doubles as a check. Also prints what torch's stock FlopCounterMode alone would report, to show why
shared.benchmark.flops adds CPU attention and norm layers to the count.
"""
from __future__ import annotations

import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from shared.benchmark.flops import FLOPS_CONVENTION, count_flops, counted_ops
from shared.models import create_model

# timm's published GMACs at 224x224 (fvcore's count) and parameter counts. The five torchvision
# counterparts list the same exact counts in torchvision's model docs, an independent source.
PUBLISHED: dict[str, tuple[float, int]] = {
    "mobilenetv3_large_100": (0.23, 5_483_032),
    "efficientnet_b0": (0.40, 5_288_548),
    "resnet50": (4.11, 25_557_032),
    "convnextv2_tiny": (4.47, 28_635_496),
    "vit_base_patch16_224": (17.58, 86_567_656),
    "deit_small_patch16_224": (4.61, 22_050_664),
    "swin_tiny_patch4_window7_224": (4.51, 28_288_354),
}
TOLERANCE = 0.03


def stock_gmacs(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9


def main() -> int:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    print(f"counted ops: {', '.join(counted_ops())}")
    print(f"convention: {FLOPS_CONVENTION}\n")
    header = (f"{'model':30s} {'GMACs':>8s} {'timm':>6s} {'err %':>7s} {'stock':>8s} {'stock err %':>11s} "
              f"{'params':>11s} {'published':>11s} {'s':>5s}")
    print(header)
    print("-" * len(header))
    failed = []
    for name, (ref_gmacs, ref_params) in PUBLISHED.items():
        start = time.perf_counter()
        model = create_model(name, num_classes=1000, in_chans=3).eval()
        flops, _ = count_flops(model, x)
        gmacs = flops / 2e9
        stock = stock_gmacs(model, x)
        params = sum(p.numel() for p in model.parameters())
        err = 100 * (gmacs - ref_gmacs) / ref_gmacs
        stock_err = 100 * (stock - ref_gmacs) / ref_gmacs
        ok = abs(err) <= 100 * TOLERANCE and params == ref_params
        if not ok:
            failed.append(name)
        print(f"{name:30s} {gmacs:8.4f} {ref_gmacs:6.2f} {err:+7.2f} {stock:8.4f} {stock_err:+11.2f} "
              f"{params:11,d} {ref_params:11,d} {time.perf_counter() - start:5.1f}"
              + ("" if ok else "  <-- FAIL"))
    print(f"\n{len(PUBLISHED) - len(failed)}/{len(PUBLISHED)} within {TOLERANCE:.0%} with exact params"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
