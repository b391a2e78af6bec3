"""The rendered CIFAR-format dataset: the real format (read back by the CIFAR-10 reader), deterministic, and
hard enough that training-set size matters."""
from __future__ import annotations

import pytest
import torch

from services.render.jobs import build_job, run_job
from shared.data import read_cifar10
from shared.storage import open_store


def _render(tmp_path, train: int, test: int, seed: int = 0, workers: int = 1):
    store = open_store(tmp_path)
    run_job(build_job("cifar-synth", train, seed, {"test_count": test}), store, "cifar", workers=workers)
    return tmp_path / "cifar"


def test_rendered_batches_read_as_cifar10_and_repeat(tmp_path):
    root = _render(tmp_path / "a", 500, 100)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["MANIFEST.json", "batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))])
    train, test = read_cifar10(root)
    assert train.images.shape == (500, 3, 32, 32) and test.images.shape == (100, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.classes[:3] == ["disc", "ring", "square"]
    assert torch.bincount(train.labels).tolist() == [50] * 10  # exactly balanced
    assert train.images.float().std() > 40  # not blank: varied colours and clutter
    again = read_cifar10(_render(tmp_path / "b", 500, 100, workers=2))[0]
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    other = read_cifar10(_render(tmp_path / "c", 500, 100, seed=1))[0]
    assert not torch.equal(other.images, train.images)


@pytest.mark.slow
def test_small_cnn_beats_chance_on_1k_and_does_better_on_5k(tmp_path):
    # One thread: on a shared 2-core machine two OpenMP threads mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train, test = read_cifar10(_render(tmp_path, 5000, 1000))
    x_test = test.images.float() / 255

    def fit(n: int) -> float:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        x, y = train.images[:n].float() / 255, train.labels[:n]
        steps = 0
        while steps < 400:  # the same number of updates for both sizes: more data, not more compute
            for idx in torch.randperm(n).split(64):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                if steps == 400:
                    break
        model.eval()
        with torch.no_grad():
            return float((model(x_test).argmax(1) == test.labels).float().mean())

    try:
        small, large = fit(1000), fit(5000)
    finally:
        torch.set_num_threads(threads)
    assert small > 0.17, small  # chance is 0.10
    # 5,000 images beat 1,000 by 7.7 points on one CPU, by more on another: different rounding, other trajectories.
    assert large > small + 0.05, (small, large)
    assert large < 0.9, large  # not trivially separable
