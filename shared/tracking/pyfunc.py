"""Building the MLflow model (pyfunc flavour, see ``pyfunc_model``) of a published trainyard model."""
from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from shared.modelcard import CARD_FILE, WEIGHTS_FILE, ModelCard

_SHARED = Path(__file__).resolve().parents[1]
# What the model's code imports; pinned to the versions it was built with.
_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "numpy", "pandas", "pillow", "pydantic", "grpcio",
                 "protobuf", "pyyaml", "mlflow")


def _requirements() -> list[str]:
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def save_pyfunc_model(path: str | Path, card: ModelCard, weights: bytes,
                      files: dict[str, bytes] | None = None) -> Path:
    """Write an MLflow model directory at ``path`` that ``mlflow.pyfunc.load_model`` predicts with.

    Classifiers take uint8 images [N, H, W, C] of any size with the card's channel count; the input example is
    one blank image at the card's input size (MLflow checks it predicts before saving). Trajectory models take
    uint8 clips [N, *clip_size] and add the predicted future position (no example: one clip is 1.5 MB).
    """
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    outputs = [ColSpec("string", "label"), ColSpec("double", "confidence")]
    if card.task == "captioning":
        inputs = TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))
        outputs = [ColSpec("string", "text")]
        example = None  # generating text for a blank view only slows the logging down
    elif card.task == "trajectory":
        inputs = TensorSpec(np.dtype("uint8"), (-1, *card.clip_size))
        outputs += [ColSpec("double", f"future_{axis}") for axis in "xyz"]
        example = None
    else:
        channels, height, width = card.input_size
        inputs = TensorSpec(np.dtype("uint8"), (-1, -1, -1, channels))
        example = np.zeros((1, height, width, channels), np.uint8)
    signature = ModelSignature(inputs=Schema([inputs]), outputs=Schema(outputs))
    with tempfile.TemporaryDirectory() as tmp:
        weights_path, card_path = Path(tmp) / WEIGHTS_FILE, Path(tmp) / CARD_FILE
        weights_path.write_bytes(weights)
        card_path.write_bytes(card.to_json())
        artifacts = {"weights": str(weights_path), "model_card": str(card_path)}
        for name in card.files:  # e.g. a captioner's tokenizer.json
            (Path(tmp) / name).write_bytes((files or {})[name])
            artifacts[name] = str(Path(tmp) / name)
        mlflow.pyfunc.save_model(
            str(path), python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts=artifacts, code_paths=[str(_SHARED)],
            signature=signature, input_example=example, pip_requirements=_requirements())
    return Path(path)
