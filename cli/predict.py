"""``trainyard predict``: classify image files with a served model over the Open Inference Protocol."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from shared.inference_client import InferenceClient, Prediction


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


def cmd_predict(server: str, model: str, version: str | int | None, paths: Sequence[str], top_k: int = 5,
                batch_size: int = 32) -> str:
    """`trainyard predict --server ADDR --model NAME [--version V] IMAGE|FOLDER...` -> printable text."""
    with InferenceClient(server) as client:
        return format_predictions(client.classify_files(model, paths, version=version, top_k=top_k,
                                                        batch_size=batch_size))


def _run(args) -> int:
    print(cmd_predict(args.server, args.model, args.version, args.images, top_k=args.top_k,
                      batch_size=args.batch_size))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images with a served model (Open Inference Protocol)")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--server", default=os.environ.get("TRAINYARD_INFERENCE_SERVER", "127.0.0.1:50055"))
    p.add_argument("--model", required=True)
    p.add_argument("--version", help="default: the newest loaded version")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="images per request")
    p.set_defaults(func=_run)
