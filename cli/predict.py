"""``trainyard predict``: classify image files, or run trajectory sample files (.npz/.npy, see
``trainyard sample``), with a served model over the Open Inference Protocol."""
from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cli.output import add_output_options, emit
from shared.inference_client import InferenceClient, read_trajectory_samples

TRAJECTORY_SUFFIXES = (".npz", ".npy")


def classify_records(client: InferenceClient, model: str, version: str | int | None, paths: Sequence[str],
                     top_k: int, batch_size: int) -> list[dict[str, Any]]:
    """Each image file's top-k labels with their confidence, best first."""
    return [{"kind": "classification", "source": p.source, "model": p.model, "version": p.version,
             "top": [{"label": label, "confidence": float(conf)} for label, conf in p.top]}
            for p in client.classify_files(model, paths, version=version, top_k=top_k, batch_size=batch_size)]


def trajectory_records(client: InferenceClient, model: str, version: str | int | None,
                       paths: Sequence[str]) -> list[dict[str, Any]]:
    """Each clip's predicted class with its probability and its future position, with the truth when the
    sample file carries it (a file of one clip)."""
    records = []
    for path in paths:
        videos = read_trajectory_samples(path)
        res = client.infer_videos(model, videos, version=version)
        truth = None
        if path.endswith(".npz") and videos.shape[0] == 1:
            with np.load(path, allow_pickle=False) as f:
                if {"class_name", "future_position"} <= set(f.files):
                    truth = {"label": str(f["class_name"]), "future_position": [float(v) for v in f["future_position"]]}
        for i, label in enumerate(res.labels):
            records.append({"kind": "trajectory", "source": path, "index": i, "model": res.model,
                            "version": res.version, "label": label, "probability": float(res.probabilities[i].max()),
                            "future_position": [float(v) for v in res.future_position[i]], "truth": truth})
    return records


def describe_records(client: InferenceClient, model: str, version, paths: Sequence[str],
                     batch_size: int) -> list[dict[str, Any]]:
    """A captioning model's description of each image file (sent encoded, as stored)."""
    files = [f for p in paths for f in (sorted(x for x in Path(p).iterdir() if x.is_file()) if Path(p).is_dir()
                                        else [Path(p)])]
    records = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        for path, text in zip(chunk, client.describe(model, [f.read_bytes() for f in chunk], version), strict=True):
            records.append({"kind": "description", "source": str(path), "model": model, "text": text})
    return records


def predict(server: str, model: str, version: str | int | None, paths: Sequence[str], top_k: int = 5,
            batch_size: int = 32) -> list[dict[str, Any]]:
    """One record per image or clip. Trajectory sample files go to a trajectory model; images are described
    by a captioning model (one whose outputs hold ``text``) and classified by any other."""
    samples = [p for p in paths if p.endswith(TRAJECTORY_SUFFIXES)]
    images = [p for p in paths if not p.endswith(TRAJECTORY_SUFFIXES)]
    with InferenceClient(server) as client:
        if images and "text" in {o.name for o in client.model_metadata(model, version).outputs}:
            return describe_records(client, model, version, images, batch_size)
        records = trajectory_records(client, model, version, samples) if samples else []
        if images:
            records += classify_records(client, model, version, images, top_k, batch_size)
        return records


def _format_classifications(records: list[dict[str, Any]]) -> list[str]:
    width = max(len(r["source"]) for r in records)
    return [f"model {records[0]['model']} version {records[0]['version']}: {len(records)} image(s)"] + [
        f"{r['source']:<{width}}  " + "  ".join(f"{t['label']} {t['confidence']:.4f}" for t in r["top"])
        for r in records]


def _format_trajectories(records: list[dict[str, Any]]) -> list[str]:
    lines = [f"model {records[0]['model']} version {records[0]['version']}"]
    for r in records:
        x, y, z = r["future_position"]
        line = (f"{Path(r['source']).name}[{r['index']}]  {r['label']} {r['probability']:.4f}  "
                f"future_position ({x:.3f}, {y:.3f}, {z:.3f})")
        if r["truth"]:
            tx, ty, tz = r["truth"]["future_position"]
            line += f"  truth {r['truth']['label']} ({tx:.3f}, {ty:.3f}, {tz:.3f})"
        lines.append(line)
    return lines


def _format_descriptions(records: list[dict[str, Any]]) -> list[str]:
    return [line for r in records for line in (r["source"], f"  {r['text']}")]


_FORMATS = {"classification": _format_classifications, "trajectory": _format_trajectories,
            "description": _format_descriptions}


def format_records(records: Sequence[dict[str, Any]]) -> str:
    """The records as text: each kind's lines under a line naming the model (descriptions: path, then text)."""
    return "\n".join(line for kind, group in itertools.groupby(records, key=lambda r: r["kind"])
                     for line in _FORMATS[kind](list(group)))


def cmd_predict(server: str, model: str, version: str | int | None, paths: Sequence[str], top_k: int = 5,
                batch_size: int = 32) -> str:
    """`trainyard predict --server ADDR --model NAME [--version V] IMAGE|FOLDER|SAMPLE.npz...` -> printable
    text."""
    return format_records(predict(server, model, version, paths, top_k, batch_size))


def _run(args) -> int:
    records = predict(args.server, args.model, args.version, args.images, top_k=args.top_k,
                      batch_size=args.batch_size)
    emit(args, records, lambda: format_records(records))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images with a served model (Open Inference Protocol)")
    p.add_argument("images", nargs="+", help="image files or folders of images, or trajectory sample files "
                                             "(.npz from `trainyard sample`, .npy clips)")
    p.add_argument("--server", default=os.environ.get("TRAINYARD_INFERENCE_SERVER", "127.0.0.1:50055"))
    p.add_argument("--model", required=True)
    p.add_argument("--version", help="default: the newest loaded version")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="images per request")
    add_output_options(p)
    p.set_defaults(func=_run)
