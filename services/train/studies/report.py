"""A study's report: its tables (cells over the seeds of a group), Markdown and HTML pages and CSV files.

The figures come from ``results`` (read back from MLflow alone, so rebuilding the report gives the same bytes)
and its plots from ``figures``. Every cell is filled or says why it is not: ``failed: <reason>``, ``running``,
``queued``, ``pruned``. Every accuracy column names its split.
"""
from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.train.studies.figures import build_figures, png_bytes
from services.train.studies.results import (
    DONE,
    StudyData,
    TrialData,
    collect,
    group,
    label,
    largest_batch_throughput,
    mean_of,
    model_axis,
    ranked_trials,
    rows_side_by_side,
    selected_trial,
    size_axis,
)

# ------------------------------------------------------------------------------------------------ cells


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(digits: int) -> Callable[[float | None], str]:
    return lambda v: "-" if v is None else f"{v:.{digits}f}"


@dataclass(frozen=True)
class Column:
    header: str
    get: Callable[[TrialData], float | str | None]
    fmt: Callable[[Any], str] = _num(4)
    numeric: bool = True
    benchmark: bool = False  # a figure of the trial's model benchmark rather than of its training


def _param(name: str, cast=float) -> Callable[[TrialData], Any]:
    def get(t: TrialData):
        value = t.params.get(name)
        try:
            return cast(value) if value is not None else None
        except ValueError:
            return value

    return get


def _metric(name: str) -> Callable[[TrialData], float | None]:
    return lambda t: t.value(name)


def _status(t: TrialData) -> str:
    if t.status == DONE:
        return "ok" + (" (selected on test)" if t.params.get("data.val_split") == "test" else "")
    return {"FAILED": f"failed: {t.reason or 'no reason recorded'}", "pruned": f"pruned: {t.reason}"}.get(
        t.status, t.status)


def _throughput(t: TrialData) -> float | None:
    value = largest_batch_throughput(t.metrics)
    return None if value is None or math.isnan(value) else value


COLUMNS: dict[str, Column] = {
    "params": Column("Params", _metric("num_params"), lambda v: "-" if v is None else f"{int(v):,}"),
    "params_m": Column("Params (M)", _metric("num_params"), lambda v: "-" if v is None else f"{v / 1e6:.2f}"),
    "train_acc": Column("Train acc % (eval mode)", _metric("train_acc"), _pct),
    "val_acc": Column("Val acc %", _metric("val_acc"), _pct),
    "test_acc": Column("Test acc % (once, at end)", _metric("test_acc"), _pct),
    "gap": Column("Overfit gap (train-val, pp)", _metric("overfit_gap"), lambda v: "-" if v is None else
                  f"{100 * v:.2f}"),
    "train_loss": Column("Train loss", _metric("train_loss")),
    "val_loss": Column("Val loss", _metric("val_loss")),
    "test_loss": Column("Test loss", _metric("test_loss")),
    "val_ece": Column("Val ECE", _metric("val_ece")),
    "epochs": Column("Epochs", _metric("epochs_done"), lambda v: "-" if v is None else f"{v:.0f}"),
    "train_time": Column("Train time (s)", _metric("train_time_total"), _num(1)),
    "lr": Column("LR", _param("optimizer.lr"), lambda v: "-" if v is None else f"{v:g}"),
    "batch_size": Column("Batch", _param("batch_size", int), lambda v: "-" if v is None else f"{v}"),
    "gflops": Column("FLOPs (G)", _metric("bench_gflops"), _num(3), benchmark=True),
    "latency_ms": Column("Latency (ms)", _metric("bench_latency_p50_ms"), _num(2), benchmark=True),
    "throughput": Column("Inference throughput (samples/s)", _throughput, _num(0), benchmark=True),
    "peak_memory_mb": Column("Peak memory (MB)", _metric("bench_peak_memory_mb"), _num(1), benchmark=True),
    "size_int8_mb": Column("Size int8 (MB)", _metric("bench_size_int8_mb"), _num(2), benchmark=True),
    "gmacs": Column("GMACs / sample", _metric("bench_gmacs"), _num(4), benchmark=True),
    "train_samples_per_s": Column("Train samples/s", _metric("samples_per_second"), _num(0)),
    # Captioning models: held-out figures from the final evaluation, and decoding cost.
    "image_gap": Column("Image gap (nats/token, test)", _metric("test_image_gap"), _num(4)),
    "extrusion_acc": Column("Extrusion count acc % (test)", _metric("test_extrusion_acc"), _pct),
    "extrusion_majority": Column("Majority class acc % (test)", _metric("test_extrusion_majority_acc"), _pct),
    "chrf": Column("chrF (test)", _metric("test_chrf"), _num(1)),
    "trainable_params": Column("Trained params", _metric("trainable_params"),
                               lambda v: "-" if v is None else f"{int(v):,}"),
    "ms_per_token": Column("Latency per generated token (ms)", _metric("bench_ms_per_token"), _num(2),
                           benchmark=True),
    # Future-position regression (trajectory models), beside the baselines on the same test samples.
    "val_rmse": Column("Val RMSE", _metric("val_rmse"), _num(3)),
    "test_rmse": Column("Test RMSE (once, at end)", _metric("test_rmse"), _num(3)),
    "test_mae": Column("Test MAE", _metric("test_mae"), _num(3)),
    "rmse_last_position": Column("Test RMSE last-position baseline", _metric("test_rmse_last_position"), _num(3)),
    "rmse_const_velocity": Column("Test RMSE const-velocity baseline", _metric("test_rmse_const_velocity"),
                                  _num(3)),
    "backbone": Column("Backbone weights", lambda t: "n/a" if t.tags.get("trainyard.row") else (
        t.params.get("model.pretrained") if t.params.get("model.pretrained") not in (None, "", "None")
        else "none (random init)"), str, numeric=False),
    "test_ece": Column("Test ECE", _metric("test_ece")),
    "val_ece_calibrated": Column("Val ECE after temperature", _metric("val_ece_calibrated")),
    "test_ece_calibrated": Column("Test ECE after temperature", _metric("test_ece_calibrated")),
    "min_val_class_acc": Column("Worst class val acc %", _metric("min_val_class_acc"), _pct),
    "min_test_class_acc": Column("Worst class test acc %", _metric("min_test_class_acc"), _pct),
    "size_mb": Column("Size fp32 (MB)", _metric("bench_size_fp32_mb"), _num(2), benchmark=True),
    "batched_ms": Column("Batched latency (ms/image)", _metric("bench_batched_ms_per_image"), _num(2),
                         benchmark=True),
    "status": Column("Status", _status, str, numeric=False),
}


def _empty_reason(trials: list[TrialData]) -> str:
    """What a cell says when no finished trial gave it a value."""
    t = trials[0]
    if t.status == "FAILED":
        return f"failed: {t.reason or 'no reason recorded'}"
    return {"pruned": "pruned", "cancelled": "cancelled"}.get(t.status, t.status)


def _cell(column: Column, trials: list[TrialData]) -> str:
    """One cell over the seeds of a group: the value, or mean ± std (n) when several finished."""
    if not column.numeric:
        return "; ".join(sorted({column.fmt(column.get(t)) for t in trials}))
    done = [t for t in trials if t.done]
    values = [v for v in (column.get(t) for t in done) if v is not None]
    if not values:
        if done and all(t.tags.get("trainyard.row") for t in done):
            return "n/a"  # a baseline or ensemble row: no training run, no benchmark of this figure
        if len(done) < len(trials):
            return _empty_reason([t for t in trials if not t.done])
        errors = sorted({t.tags["bench_error"] for t in done if t.tags.get("bench_error")})
        if column.benchmark:
            return f"benchmark failed: {errors[0]}" if errors else "not benchmarked"
        return "not recorded"
    if len(set(values)) == 1:  # one value, or the same figure every time (a parameter count)
        text = column.fmt(values[0])
    else:
        mean, std = statistics.fmean(values), statistics.stdev(values)
        text = f"{column.fmt(mean)} ± {column.fmt(std).lstrip('-')} (n={len(values)})"
    missing = len(trials) - len(done)
    return f"{text} [{missing} not finished]" if missing else text


# ------------------------------------------------------------------------------------------------ tables


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3>{note}<table><tr>{head}</tr>{body}</table>"

    def csv(self) -> str:
        import csv

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.headers)
        writer.writerows(self.rows)
        return buf.getvalue()


def _trial_name(t: TrialData) -> str:
    sets = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.overrides.items())
    return sets or t.trial_id


def build_tables(data: StudyData) -> list[Table]:
    spec = data.study["spec"]
    group_axes = [a for a in data.axes if a != "seed"]
    columns = [COLUMNS[c] for c in spec["report"]["columns"]]
    seeds = f" Mean ± std over seeds {spec['grid']['seed']}." if "seed" in spec["grid"] else ""
    if group_axes:
        rows = [[*map(label, key), *(_cell(c, ts) for c in columns)]
                for key, ts in sorted(group(data.trials, group_axes).items())]
    else:  # no grid axes (a search, or one config): a row per trial, named by what it sets
        rows = [[_trial_name(t), *(_cell(c, [t]) for c in columns)] for t in data.trials]
    rows += [[t.run_name, *("-" for _ in group_axes[1:]), *(_cell(c, [t]) for c in columns)] for t in data.extra_rows]
    results = Table(
        "Training results", [*(group_axes or ["Row"]), *(c.header for c in columns)], rows,
        note="Val: the split selection saw, at each trial's selected epoch. Test: evaluated once, at the end, on the "
             f"selected checkpoint. Train: eval mode, no augmentation, on a fixed sample of the training data.{seeds}"
             + (" The rows after the trials are not training runs: they are scored on the same validation and test "
                "splits (see below)." if data.extra_rows else ""))
    tables = [results]
    model, size = model_axis(data), size_axis(data)
    if model:
        bench = [COLUMNS[c] for c in ("params_m", "gflops", "latency_ms", "throughput", "peak_memory_mb",
                                      "size_int8_mb")]
        by_model = group(data.trials, [model])
        tables.append(Table(
            "Benchmark", ["Model", *(c.header for c in bench)],
            [[label(k[0]), *(_cell(c, ts) for c in bench)] for k, ts in sorted(by_model.items())],
            note="Each trial's exported model, measured when the trial finished (shared.benchmark; latency: batch-1 "
                 "median; throughput: the largest batch). Over trials of one model: mean ± std."))
    if model and size:
        sizes = sorted({t.axes[size] for t in data.trials})
        val = COLUMNS["val_acc"]
        rows = []
        for (m,), ts in sorted(group(data.trials, [model]).items()):
            cells = [_cell(val, [t for t in ts if t.axes[size] == s]) for s in sizes]
            rows.append([label(m), *cells])
        tables.append(Table("Sample efficiency (val acc % by training-set size)", ["Model", *map(str, sizes)], rows))
        tables.append(_summary(data, model, size, sizes))
    tables += _extras_tables(data, model)
    failed = [t for t in data.trials if t.status in ("FAILED", "pruned", "cancelled")]
    if failed:
        tables.append(Table("Trials that did not finish", ["Trial", *data.axes, "Status"],
                            [[t.trial_id, *(str(t.axes.get(a)) for a in data.axes), _status(t)] for t in failed]))
    return tables


def _criterion_cell(crit: dict[str, Any], t: TrialData | None) -> str:
    value = t.value(crit["metric"]) if t is not None else None
    if value is None:
        return "not measured"
    ok = (crit.get("min") is None or value > crit["min"]) and (crit.get("max") is None or value < crit["max"])
    fmt = _pct if _is_accuracy(crit["metric"]) else _num(2)
    return f"{fmt(value)} {'met' if ok else 'NOT met'}"


def _is_accuracy(metric: str) -> bool:
    """Accuracies are shown in percent (val_acc, min_test_class_acc, ...)."""
    return metric.endswith("acc")


def _target(crit: dict[str, Any]) -> str:
    show = (lambda v: f"{100 * v:g}%") if _is_accuracy(crit["metric"]) else (lambda v: f"{v:g}")
    parts = ([f"> {show(crit['min'])}"] if crit.get("min") is not None else []) + (
        [f"< {show(crit['max'])}"] if crit.get("max") is not None else [])
    return " and ".join(parts)


def _extras_tables(data: StudyData, model: str | None) -> list[Table]:
    spec = data.study["spec"]
    tables: list[Table] = []
    classes = (data.extras or {}).get("classes") or sorted(
        {k.split("/", 1)[1] for t in data.trials for k in t.metrics if k.startswith("test_class_acc/")})
    sides = rows_side_by_side(data, model)
    if "per_class" in spec["report"]["plots"] and classes:
        for split, note in (("test", "evaluated once, at the end"), ("val", "the split selection saw")):
            rows = [[c, *(_cell(Column("", _metric(f"{split}_class_acc/{c}"), _pct), ts) for _, ts in sides)]
                    for c in classes]
            rows.append(["all", *(_cell(COLUMNS[f"{split}_acc"], ts) for _, ts in sides)])
            tables.append(Table(f"Per-class accuracy % ({split}: {note})", ["Class", *(n for n, _ in sides)], rows))
    best = selected_trial(data)
    rows_by_kind = {t.tags["trainyard.row"]: t for t in data.extra_rows}
    if spec.get("criteria"):
        candidates = [(f"{t.run_name or t.trial_id}{' (selected)' if t is best else ''}", t)
                      for t in ranked_trials(data)]
        candidates += [(t.run_name, t) for t in data.extra_rows]
        tables.append(Table(
            "Success criteria", ["Criterion", "Target", *(n for n, _ in candidates)],
            [[c.get("label") or c["metric"], _target(c), *(_criterion_cell(c, t) for _, t in candidates)]
             for c in spec["criteria"]],
            note="Trials best on the objective (validation) first; the selected model is the first. Test figures "
                 "come from each trial's one final evaluation; size, latency and memory from its benchmark (CPU, "
                 "fp32)."))
    selected = (data.extras or {}).get("selected")
    if best is not None and selected and selected.get("trial_id") == best.trial_id:
        int8 = selected["int8"]
        m = best.value

        def fp(key: str) -> str:
            return _num(2)(m(key))

        tables.append(Table(
            f"Selected model {best.run_name}: fp32 and its int8 variant",
            ["Figure", "fp32", "int8 (dynamic, Linear layers)"],
            [["Val acc %", _pct(m("val_acc")), _pct(int8.get("val_acc"))],
             ["Test acc %", _pct(m("test_acc")), _pct(int8.get("test_acc"))],
             ["Size (MB)", fp("bench_size_fp32_mb"), fp("bench_size_int8_mb")],
             ["Latency batch 1 (ms, p50)", fp("bench_latency_p50_ms"), fp("bench_int8_latency_p50_ms")],
             ["Batched latency (ms/image)", fp("bench_batched_ms_per_image"), "not measured"],
             ["Peak memory (MB)", fp("bench_peak_memory_mb"), "not measured"],
             ["Val ECE", _num(4)(m("val_ece")), _num(4)(int8.get("val_ece"))],
             ["Test ECE", _num(4)(m("test_ece")), _num(4)(int8.get("test_ece"))],
             ["Val ECE after temperature", _num(4)(m("val_ece_calibrated")), "-"],
             ["Test ECE after temperature", _num(4)(m("test_ece_calibrated")), "-"],
             ["Temperature (fitted on val)", _num(3)(m("temperature")), "-"]],
            note=f"int8: {int(int8.get('quantized_linear_layers', 0))} Linear layers quantized dynamically "
                 "(shared.quantize, what the inference server's --quantize serves); convolutions stay fp32."))
    if "ensemble" in rows_by_kind:
        ens = next(r for r in data.extras["rows"] if r["kind"] == "ensemble")
        tables.append(Table("Ensemble members", ["Member (best on the objective first)"],
                            [[m] for m in ens.get("members", [])]))
    return tables


def _summary(data: StudyData, model: str, size: str, sizes: list) -> Table:
    """Per model: validation accuracy at the smallest size, params and latency per accuracy point, gap, ranks."""
    rows = []
    for (m,), ts in sorted(group(data.trials, [model]).items()):
        small = [t for t in ts if t.axes[size] == sizes[0]]
        acc_small, acc = mean_of(small, "val_acc"), mean_of(ts, "val_acc")
        params, latency = mean_of(ts, "num_params"), mean_of(ts, "bench_latency_p50_ms")
        rows.append({"model": label(m), "acc_small": acc_small,
                     "params_per_acc": params / (100 * acc) if params and acc else None,
                     "latency_per_acc": latency / (100 * acc) if latency and acc else None,
                     "gap": mean_of(ts, "overfit_gap")})

    def rank(key: str, reverse: bool) -> dict[str, str]:
        scored = sorted((r for r in rows if r[key] is not None), key=lambda r: r[key], reverse=reverse)
        return {r["model"]: str(i + 1) for i, r in enumerate(scored)}

    ranks = {k: rank(k, k == "acc_small") for k in ("acc_small", "params_per_acc", "latency_per_acc", "gap")}
    body = [[r["model"], _pct(r["acc_small"]), ranks["acc_small"].get(r["model"], "-"),
             "-" if r["params_per_acc"] is None else f"{r['params_per_acc']:,.0f}", ranks["params_per_acc"].get(
                 r["model"], "-"),
             _num(3)(r["latency_per_acc"]), ranks["latency_per_acc"].get(r["model"], "-"),
             "-" if r["gap"] is None else f"{100 * r['gap']:.2f}", ranks["gap"].get(r["model"], "-")] for r in rows]
    return Table(f"Comparison summary (val acc at {size}={sizes[0]}; per-accuracy figures over all sizes)",
                 ["Model", "Val acc % (smallest)", "Rank", "Params per acc point", "Rank", "Latency ms per acc point",
                  "Rank", "Overfit gap (pp)", "Rank"], body)


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Report:
    markdown: str
    html: str
    tables: list[Table]
    pngs: dict[str, bytes]

    def files(self) -> dict[str, bytes]:
        out = {"report.md": self.markdown.encode(), "report.html": self.html.encode()}
        out.update({f"plots/{name}": png for name, png in self.pngs.items()})
        out.update({f"tables/{_slug(t.title)}.csv": t.csv().encode() for t in self.tables})
        return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")[:60]


def build_report(data: StudyData) -> Report:
    spec = data.study["spec"]
    title = spec["report"].get("title") or f"Study {spec['name']}"
    tables = build_tables(data)
    pngs = {name: png_bytes(fig) for name, fig in sorted(build_figures(data).items())}
    if data.gallery is not None and "misclassified" in spec["report"]["plots"]:
        pngs["misclassified_test.png"] = data.gallery
    counts: dict[str, int] = {}
    for t in data.trials:
        status = t.status.lower()
        counts[status] = counts.get(status, 0) + 1
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    objective = spec["objective"]
    intro = (f"Study `{data.study['study_id']}`: {len(data.trials)} trials ({status}). Grid: "
             + "; ".join(f"{a} = {v}" for a, v in spec["grid"].items())
             + f". Objective: {objective['direction']} {objective['metric']} (validation). "
             f"MLflow parent run {data.study.get('parent_run_id', '?')}.")
    md = [f"# {title}", "", intro, ""]
    md += [t.markdown() for t in tables]
    md += [f"![{name}](plots/{name})\n" for name in pngs]
    body = [f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>", *(t.html() for t in tables)]
    body += [f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" src="data:image/png;base64,'
             f'{base64.b64encode(png).decode()}">' for name, png in pngs.items()]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #999;padding:3px 6px;font-size:13px}th{background:#eee}img{max-width:100%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return Report("\n".join(md), page, tables, pngs)


def report_from_mlflow(tracking_uri: str | None, parent_run_id: str) -> Report:
    """The report, rebuilt from MLflow alone (a fresh client: nothing in this process is reused)."""
    from mlflow import MlflowClient

    from shared.settings import load_settings

    return build_report(collect(MlflowClient(tracking_uri or load_settings().mlflow_uri), parent_run_id))
