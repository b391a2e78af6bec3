"""Benchmark results as CSV and Markdown tables plus a plot.

The first six columns are those of the experiment log the platform replaces (Model, Params (M), FLOPs (G),
Latency (ms), Throughput (img/s), Peak Memory (MB)); the rest are the extra figures. A figure that could
not be measured shows ``error: <reason>``, one that was not asked for shows ``-``: no cell is ever blank.
"""
from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from shared.benchmark.measure import ModelResult
from shared.errors import InvalidArgument

LOG_COLUMNS = ["Model", "Params (M)", "FLOPs (G)", "Latency (ms)", "Throughput (img/s)", "Peak Memory (MB)"]
NOT_REQUESTED = "-"


def _fmt(value: float | int | None, digits: int, error: str | None = None, fallback: str = NOT_REQUESTED) -> str:
    if value is not None:
        return f"{value:.{digits}f}"
    if error:
        return f"error: {error}"
    return fallback


def _batch_sizes(results: list[ModelResult]) -> list[int]:
    return sorted({bs for r in results for bs in r.throughput})


def columns(results: list[ModelResult]) -> list[str]:
    extra = ["GMACs", "Trainable Params (M)", "Latency p90 (ms)", "Latency p99 (ms)", "Threads"]
    extra += [f"Throughput bs={bs} (img/s)" for bs in _batch_sizes(results)]
    extra += ["Size fp32 (MB)", "Size int8 (MB)", "Int8 Latency (ms)", "Test acc fp32 (%)", "Test acc int8 (%)",
              "Test acc change (pp)", "Device", "Input", "Hardware", "MLflow Run", "Notes"]
    return LOG_COLUMNS + extra


def row(result: ModelResult, batch_sizes: list[int]) -> dict[str, str]:
    r = result
    fatal = r.error
    # A fatal error explains every empty figure of the row; the Notes column carries its full text.
    miss = "see Notes" if fatal else None
    params_m = r.params_total / 1e6 if r.params_total is not None else None
    trainable_m = r.params_trainable / 1e6 if r.params_trainable is not None else None
    largest = max(r.throughput) if r.throughput else None
    notes = []
    if fatal:
        notes.append(f"error: {fatal}")
    if largest is not None:
        notes.append(f"throughput at batch {largest}")
    if r.latency_note:
        notes.append(r.latency_note)
    if r.int8_note:
        notes.append(r.int8_note)
    if r.tracking_error:
        notes.append(f"not tracked: {r.tracking_error}")
    out = {
        "Model": r.model,
        "Params (M)": _fmt(params_m, 3, miss),
        "FLOPs (G)": _fmt(r.gflops, 3, miss or r.flops_error, "error: FLOPs not counted"),
        "Latency (ms)": _fmt(r.latency_p50_ms, 2, miss or r.latency_error),
        "Throughput (img/s)": _fmt(r.throughput.get(largest) if largest else None, 1, miss or r.throughput_error),
        "Peak Memory (MB)": _fmt(r.peak_memory_mb, 1, miss or r.memory_error),
        "GMACs": _fmt(r.gmacs, 3, miss or r.flops_error, "error: FLOPs not counted"),
        "Trainable Params (M)": _fmt(trainable_m, 3, miss),
        "Latency p90 (ms)": _fmt(r.latency_p90_ms, 2, miss or r.latency_error),
        "Latency p99 (ms)": _fmt(r.latency_p99_ms, 2, miss or r.latency_error),
        "Threads": str(r.threads) if r.threads else NOT_REQUESTED,
        "Size fp32 (MB)": _fmt(r.size_fp32_mb, 2, miss or r.quant_error),
        "Size int8 (MB)": _fmt(r.size_int8_mb, 2, miss or r.quant_error),
        "Int8 Latency (ms)": _fmt(r.int8_latency_p50_ms, 2, miss or r.quant_error),
        "Test acc fp32 (%)": _fmt(r.accuracy_fp32, 2, r.accuracy_error),
        "Test acc int8 (%)": _fmt(r.accuracy_int8, 2, r.accuracy_error),
        "Test acc change (pp)": _fmt(r.accuracy_delta, 2, r.accuracy_error),
        "Device": r.device,
        "Input": "x".join(map(str, r.input_shape)) or NOT_REQUESTED,
        "Hardware": f"{r.hardware.cpu} / {r.hardware.gpu}" if r.hardware and r.hardware.gpu
        else (r.hardware.cpu if r.hardware else NOT_REQUESTED),
        "MLflow Run": r.mlflow_run_id or NOT_REQUESTED,
        "Notes": "; ".join(notes) or NOT_REQUESTED,
    }
    for bs in batch_sizes:
        out[f"Throughput bs={bs} (img/s)"] = _fmt(r.throughput.get(bs), 1, miss or r.throughput_error)
    return out


def rows(results: Iterable[ModelResult]) -> tuple[list[str], list[dict[str, str]]]:
    results = list(results)
    sizes = _batch_sizes(results)
    return columns(results), [row(r, sizes) for r in results]


def to_markdown(results: Iterable[ModelResult]) -> str:
    results = list(results)
    cols, table = rows(results)

    def cell(text: str) -> str:
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 240 else text[:237] + "..."

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in table]
    footer = []
    if results:
        footer.append(f"\nFLOPs: {results[0].flops_convention}")
        hw = next((r.hardware for r in results if r.hardware), None)
        if hw:
            footer.append(f"Hardware: {hw.cpu}, {hw.usable_cpus} usable CPUs, torch {hw.torch_version}"
                          + (f", GPU {hw.gpu}" if hw.gpu else "") + f" (fingerprint {hw.digest}).")
        methods = sorted({r.peak_memory_method for r in results if r.peak_memory_method})
        footer += [f"Peak memory: {m}." for m in methods]
        footer.append("Latency: batch 1, median (p50) after warm-up.")
    return "\n".join(lines + footer) + "\n"


def write_csv(results: Iterable[ModelResult], path: str | Path) -> Path:
    cols, table = rows(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(table)
    return path


def plot(results: Iterable[ModelResult], path: str | Path) -> Path | None:
    """Latency vs params (and accuracy vs latency when accuracies exist); None when nothing is plottable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = list(results)
    pts = [r for r in results if r.latency_p50_ms is not None and r.params_total is not None]
    if not pts:
        return None
    acc = [r for r in pts if r.accuracy_fp32 is not None]
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(12 if acc else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    for r in pts:
        ax.scatter(r.params_total / 1e6, r.latency_p50_ms)
        ax.annotate(r.model, (r.params_total / 1e6, r.latency_p50_ms), fontsize=8)
    ax.set(xlabel="Params (M)", ylabel="Latency p50, batch 1 (ms)", title="Latency vs params")
    ax.grid(alpha=0.3)
    if acc:
        ax = axes[0][1]
        for r in acc:
            ax.scatter(r.latency_p50_ms, r.accuracy_fp32, label=f"{r.model} fp32")
            if r.accuracy_int8 is not None and r.int8_latency_p50_ms is not None:
                ax.scatter(r.int8_latency_p50_ms, r.accuracy_int8, marker="x", label=f"{r.model} int8")
        ax.set(xlabel="Latency p50, batch 1 (ms)", ylabel="Top-1 accuracy (%)", title="Accuracy vs latency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_tables(results: Iterable[ModelResult], out_path: str | Path) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.png`` beside ``out_path`` (.md, .csv or no suffix).

    Returns the paths written, keyed "markdown", "csv" and (when there was something to plot) "plot".
    """
    results = list(results)
    out = Path(out_path)
    if out.suffix not in ("", ".md", ".csv"):
        raise InvalidArgument(f"table output {out} must end in .md or .csv (or have no suffix)")
    stem = out.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_suffix(".md")
    md.write_text(to_markdown(results))
    written = {"markdown": md, "csv": write_csv(results, stem.with_suffix(".csv"))}
    png = plot(results, stem.with_suffix(".png"))
    if png is not None:
        written["plot"] = png
    return written
