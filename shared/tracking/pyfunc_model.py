"""The MLflow pyfunc flavour of a published trainyard model, logged as "models from code".

MLflow copies this file into the logged model and runs it on ``mlflow.pyfunc.load_model``; the weights
(safetensors) and the model card travel as artifacts, and the ``shared`` package as the model's code path.
So loading a trainyard model through MLflow unpickles nothing, and the input path is the platform's own
(``shared.predict``), the one the inference server applies.

Input: uint8 images [N, H, W, C] (any size, 1, 3 or 4 channels), or for trajectory models uint8 clips
[N, cameras, frames, C, H, W]. Output: a DataFrame with the top-1 ``label`` and its ``confidence`` (the
card's calibration temperature applied), and for trajectory models ``future_x``, ``future_y``, ``future_z``;
captioning models give one ``text`` column (their tokenizer travels as an artifact beside the weights).
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class TrainyardModel(PythonModel):
    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from shared.modelcard import ModelCard, build_module
        from shared.predict import signature_for

        card_path = Path(context.artifacts["model_card"])
        self.card = ModelCard.from_json(card_path.read_bytes(), str(card_path))
        files = {name: Path(context.artifacts[name]).read_bytes() for name in self.card.files}
        model = build_module(self.card, load_file(context.artifacts["weights"]), str(card_path.parent), files)
        self.signature = signature_for(self.card, model)

    # np.ndarray: MLflow passes the array as is (the signature, not the hint, validates it).
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        from shared.predict import FUTURE_POSITION, PROBABILITIES, TEXT

        raw = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.uint8))
        if self.card.task in ("classification", "captioning"):
            if raw.dim() == 3:  # [N, H, W]: grayscale without a channel axis
                raw = raw.unsqueeze(-1)
            raw = raw.permute(0, 3, 1, 2)
        out = self.signature(raw)
        if TEXT in out:
            return pd.DataFrame({"text": out[TEXT]})
        confidence, index = out[PROBABILITIES].max(dim=1)
        frame = {"label": [self.card.classes[i] for i in index.tolist()], "confidence": confidence.double().numpy()}
        if FUTURE_POSITION in out:
            position = out[FUTURE_POSITION].double().numpy()
            frame.update({f"future_{axis}": position[:, i] for i, axis in enumerate("xyz")})
        return pd.DataFrame(frame)


mlflow.models.set_model(TrainyardModel())
