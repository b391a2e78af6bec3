"""The MLflow pyfunc flavour of a published trainyard classifier, logged as "models from code".

MLflow copies this file into the logged model and runs it on ``mlflow.pyfunc.load_model``; the weights
(safetensors) and the model card travel as artifacts, and the ``shared`` package as the model's code path.
So loading a trainyard model through MLflow unpickles nothing, and preprocessing is the platform's own
(``shared.preprocess``), the same the inference server applies.

Input: uint8 images [N, H, W, C] (any size, 1, 3 or 4 channels). Output: a DataFrame with the top-1
``label`` and its ``confidence`` (the card's calibration temperature applied).
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel


class TrainyardClassifier(PythonModel):
    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        from shared.modelcard import ModelCard, build_module
        from shared.preprocess import Preprocessor

        card_path = Path(context.artifacts["model_card"])
        self.card = ModelCard.from_json(card_path.read_bytes(), str(card_path))
        self.model = build_module(self.card, load_file(context.artifacts["weights"]), str(card_path.parent))
        self.preprocess = Preprocessor.from_card(self.card)
        self.temperature = float(getattr(self.card, "temperature", None) or 1.0)

    # np.ndarray: MLflow passes the array as is (the signature, not the hint, validates it).
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.uint8))
        if images.dim() == 3:  # [N, H, W]: grayscale without a channel axis
            images = images.unsqueeze(-1)
        with torch.inference_mode():
            logits = self.model(self.preprocess(images.permute(0, 3, 1, 2)))
            probs = torch.softmax(logits.float() / self.temperature, dim=1)
        confidence, index = probs.max(dim=1)
        return pd.DataFrame({"label": [self.card.classes[i] for i in index.tolist()],
                             "confidence": confidence.double().numpy()})


mlflow.models.set_model(TrainyardClassifier())
