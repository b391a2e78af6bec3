"""Figures for MLflow and reports (matplotlib's object API: no global state, safe in threads)."""
from __future__ import annotations

import numpy as np


def plot_curves(history: list[dict[str, float]]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    if all("val_acc" in h for h in history):
        ax2.plot(epochs, [h["train_acc"] for h in history], label="train")
        ax2.plot(epochs, [h["val_acc"] for h in history], label="val")
        ax2.set_ylabel("accuracy")
    else:  # captioning: validation loss with another part's image against the true one
        ax2.plot(epochs, [h["val_loss_shuffled"] for h in history], label="val, shuffled images")
        ax2.plot(epochs, [h["val_loss"] for h in history], label="val, true images")
        ax2.set_ylabel("cross-entropy per answer token")
    ax2.set_xlabel("epoch")
    ax2.legend()
    fig.tight_layout()
    return fig


def plot_confusion(cm: np.ndarray, classes: list[str]):
    from matplotlib.figure import Figure

    n = len(classes)
    fig = Figure(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 2)))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        peak = cm.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                        color="white" if cm[i, j] > peak / 2 else "black", fontsize=8)
    fig.tight_layout()
    return fig


def plot_reliability(bins: np.ndarray, title: str = ""):
    """Reliability diagram from per-bin sums (count, confidence, correct; see shared.evaluation): accuracy
    per confidence bin against the diagonal of perfect calibration, with the gap shaded."""
    from matplotlib.figure import Figure

    count, conf, correct = (np.asarray(bins[i], dtype=float) for i in range(3))
    n_bins = len(count)
    edges = np.linspace(0, 1, n_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    filled = count > 0
    acc = np.divide(correct, count, out=np.zeros_like(correct), where=filled)
    mean_conf = np.divide(conf, count, out=centers.copy(), where=filled)
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.bar(centers[filled], acc[filled], width=1 / n_bins, edgecolor="black", label="accuracy")
    ax.bar(centers[filled], (mean_conf - acc)[filled], bottom=acc[filled], width=1 / n_bins, color="red",
           alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def plot_regression_errors(rows: dict[str, dict[str, float]], title: str = ""):
    """Grouped bars of RMSE overall and per axis, one group per predictor (the model and its baselines):
    ``rows`` maps a predictor's name to ``{"all": rmse, "x": ..., "y": ..., "z": ...}``."""
    from matplotlib.figure import Figure

    keys = ["all", "x", "y", "z"]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    for i, (name, values) in enumerate(rows.items()):
        ax.bar(np.arange(len(keys)) + i * width, [values.get(k, np.nan) for k in keys], width, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(rows) - 1) / 2, ["RMSE (3D)", "x", "y", "z"])
    ax.set_ylabel("error (world units)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_captions(images: np.ndarray, generated: list[str], truth: list[str], title: str = ""):
    """Views (N, H, W, 3 uint8) each beside its generated description and the true one."""
    import textwrap

    from matplotlib.figure import Figure

    n = len(images)
    fig = Figure(figsize=(12, 2.6 * n))
    axes = fig.subplots(n, 2, squeeze=False, gridspec_kw={"width_ratios": [1, 5]})
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].axis("off")
        text = (f"generated: {textwrap.fill(generated[i], 120)}\n\ntruth: {textwrap.fill(truth[i], 120)}")
        axes[i, 1].text(0, 1, text, va="top", ha="left", fontsize=7, family="monospace", wrap=True)
        axes[i, 1].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
