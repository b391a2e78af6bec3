"""``trainyard predict``: classify image files, or run trajectory sample files (.npz/.npy, see
``trainyard sample``), with a served model over the Open Inference Protocol."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared.inference_client import InferenceClient, Prediction, read_trajectory_samples

TRAJECTORY_SUFFIXES = (".npz", ".npy")


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """One line per image: the source, then each label with its confidence, best first."""
    if not predictions:
        return ""
    head = f"model {predictions[0].model} version {predictions[0].version}: {len(predictions)} image(s)"
    width = max(len(p.source) for p in predictions)
    lines = [head]
    for p in predictions:
        lines.append(f"{p.source:<{width}}  " + "  ".join(f"{label} {conf:.4f}" for label, conf in p.top))
    return "\n".join(lines)


def predict_trajectories(client: InferenceClient, model: str, version: str | int | None,
                         paths: Sequence[str]) -> str:
    """One line per clip: the predicted class and its probability, the future position, and the truth
    when the sample file carries it."""
    lines = []
    for path in paths:
        videos = read_trajectory_samples(path)
        res = client.infer_videos(model, videos, version=version)
        truth = {}
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                truth = {k: f[k] for k in ("class_name", "future_position") if k in f}
        if not lines:
            lines.append(f"model {res.model} version {res.version}")
        for i, label in enumerate(res.labels):
            x, y, z = res.future_position[i]
            line = (f"{Path(path).name}[{i}]  {label} {res.probabilities[i].max():.4f}  "
                    f"future_position ({x:.3f}, {y:.3f}, {z:.3f})")
            if truth and videos.shape[0] == 1:
                tx, ty, tz = truth["future_position"]
                line += f"  truth {truth['class_name']} ({tx:.3f}, {ty:.3f}, {tz:.3f})"
            lines.append(line)
    return "\n".join(lines)


def describe_images(client: InferenceClient, model: str, version, paths: Sequence[str], batch_size: int) -> str:
    """A captioning model's description of each image file (sent encoded, as stored)."""
    files = [f for p in paths for f in (sorted(x for x in Path(p).iterdir() if x.is_file()) if Path(p).is_dir()
                                        else [Path(p)])]
    lines = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        for path, text in zip(chunk, client.describe(model, [f.read_bytes() for f in chunk], version), strict=True):
            lines.append(f"{path}\n  {text}")
    return "\n".join(lines)


def cmd_predict(server: str, model: str, version: str | int | None, paths: Sequence[str], top_k: int = 5,
                batch_size: int = 32) -> str:
    """`trainyard predict --server ADDR --model NAME [--version V] IMAGE|FOLDER|SAMPLE.npz...` -> printable
    text. Trajectory sample files go to a trajectory model; images are described by a captioning model (one
    whose outputs hold ``text``) and classified by any other."""
    samples = [p for p in paths if p.endswith(TRAJECTORY_SUFFIXES)]
    images = [p for p in paths if not p.endswith(TRAJECTORY_SUFFIXES)]
    with InferenceClient(server) as client:
        if images and "text" in {o.name for o in client.model_metadata(model, version).outputs}:
            return describe_images(client, model, version, images, batch_size)
        parts = []
        if samples:
            parts.append(predict_trajectories(client, model, version, samples))
        if images:
            parts.append(format_predictions(client.classify_files(model, images, version=version, top_k=top_k,
                                                                  batch_size=batch_size)))
        return "\n".join(parts)


def _run(args) -> int:
    print(cmd_predict(args.server, args.model, args.version, args.images, top_k=args.top_k,
                      batch_size=args.batch_size))
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
    p.set_defaults(func=_run)
