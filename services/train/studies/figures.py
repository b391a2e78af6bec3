"""A study's plots (matplotlib figures, rendered without a display) and the one PNG writer of its report."""
from __future__ import annotations

import io
from typing import Any

from services.train.studies.results import StudyData, group, label, mean_of, model_axis, rows_side_by_side, size_axis


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (lower x, higher y)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]


def _finish(figures: dict[str, Any], name: str, fig, ax, *, ylabel: str, xlabel: str = "", title: str = "",
            **legend) -> None:
    """Label the axes, add the title and a legend (``legend``: its keyword arguments; none, no legend), lay the
    figure out and keep it as ``name``."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(**legend)
    fig.tight_layout()
    figures[name] = fig


def build_figures(data: StudyData) -> dict[str, Any]:
    from matplotlib.figure import Figure

    wanted = set(data.study["spec"]["report"]["plots"])
    model, size = model_axis(data), size_axis(data)
    done = [t for t in data.trials if t.done]
    figures: dict[str, Any] = {}
    groups = group(done, [model]) if model else {("all",): done}
    if "accuracy_vs_size" in wanted and size and done:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for key, ts in sorted(groups.items()):
            xs = sorted({t.axes[size] for t in ts})
            ys = [100 * mean_of([t for t in ts if t.axes[size] == x], "val_acc") for x in xs]
            ax.plot(xs, ys, marker="o", label=label(key[0]) if model else "all")
        ax.set_xscale("log")
        _finish(figures, "accuracy_vs_size.png", fig, ax, xlabel="training samples", ylabel="val acc %",
                title="Sample efficiency", fontsize=7)
    for name, key, xlabel in (("params_vs_accuracy", "num_params", "parameters"),
                              ("latency_vs_accuracy", "bench_latency_p50_ms", "latency (ms, batch 1)")):
        pts = [(t.value(key), 100 * t.value("val_acc"), t) for t in done
               if t.value(key) is not None and t.value("val_acc") is not None]
        if name not in wanted or not pts:
            continue
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for key_, ts in sorted(groups.items()):
            mine = [(x, y) for x, y, t in pts if t in ts]
            if mine:
                ax.scatter(*zip(*mine, strict=True), label=label(key_[0]) if model else "all", s=18)
        if name == "latency_vs_accuracy":
            front = sorted((pts[i][0], pts[i][1]) for i in _pareto([(x, y) for x, y, _ in pts]))
            ax.plot(*zip(*front, strict=True), "k--", linewidth=1, label="Pareto front")
        ax.set_xscale("log")
        _finish(figures, f"{name}.png", fig, ax, xlabel=xlabel, ylabel="val acc %", fontsize=7)
    if "loss_curves" in wanted and done:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for t in done:
            for key, style in (("train_loss", "-"), ("val_loss", "--")):
                hist = t.history.get(key, [])
                if hist:
                    ax.plot(*zip(*hist, strict=True), style, linewidth=1, label=f"{t.run_name} {key}")
        _finish(figures, "loss_curves.png", fig, ax, xlabel="epoch", ylabel="loss (eval mode)",
                title="Loss curves (solid: train, dashed: val)", **({"fontsize": 6} if len(done) <= 6 else {}))
    if "accuracy_curves" in wanted and done:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for t in done:
            hist = t.history.get("val_acc", [])
            if hist:
                steps, values = zip(*hist, strict=True)
                ax.plot(steps, [100 * v for v in values], marker=".", linewidth=1, label=t.run_name or t.trial_id)
        for t in data.extra_rows:
            if t.value("val_acc") is not None:
                ax.axhline(100 * t.value("val_acc"), linestyle=":", linewidth=1, color="gray")
                ax.annotate(t.run_name, (1, 100 * t.value("val_acc")), fontsize=6, color="gray")
        _finish(figures, "accuracy_curves.png", fig, ax, xlabel="epoch", ylabel="val acc %",
                title="Validation accuracy by epoch (dotted: rows that are not training runs)", fontsize=6)
    classes = (data.extras or {}).get("classes") or []
    if "per_class" in wanted and classes:
        sides = [(name, ts) for name, ts in rows_side_by_side(data, model) if any(t.done for t in ts)]
        fig = Figure(figsize=(max(6, 1.2 * len(classes) * max(1, len(sides)) / 2), 4))
        ax = fig.subplots()
        width = 0.8 / max(1, len(sides))
        for i, (name, ts) in enumerate(sides):
            ys = [100 * (mean_of(ts, f"test_class_acc/{c}") or 0) for c in classes]
            ax.bar([j + i * width for j in range(len(classes))], ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))], classes)
        ax.set_ylim(0, 100)
        _finish(figures, "per_class_test.png", fig, ax, ylabel="test acc % (once, at end)",
                title="Per-class test accuracy", fontsize=7, loc="lower right")
    if "overfit_gap" in wanted and done:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        labels = [t.run_name or t.trial_id for t in done]
        ax.bar(range(len(done)), [100 * (t.value("overfit_gap") or 0) for t in done])
        ax.set_xticks(range(len(done)), labels, rotation=60, ha="right", fontsize=6)
        _finish(figures, "overfit_gap.png", fig, ax, ylabel="train acc - val acc (pp)",
                title="Overfitting gap at the selected epoch")
    return figures


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    # No software/date metadata: the same figure gives the same bytes.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()
