"""A published model's prediction signature: raw uint8 input -> the model's input -> named outputs.

One home for what a model takes and gives, per ``ModelCard.task``, so the inference server, the MLflow
pyfunc model and ``trainyard predict`` all feed a model the same way and read the same outputs:

- ``classification``: uint8 images (N, C, H, W) of any size -> ``shared.preprocess.Preprocessor`` ->
  ``{"probabilities": (N, classes)}`` (softmax of the logits over the card's calibration temperature);
- ``trajectory``: uint8 clips (N, cameras, frames, C, H, W) exactly the card's ``clip_size`` -> the model's
  own ``prepare`` (``shared.models.video``) -> ``{"probabilities": (N, classes), "future_position": (N, 3)}``
  (world units: the model maps its standardised head back itself);
- ``captioning``: uint8 images (N, 3, H, W) of any size -> ``shared.models.captioner.preprocess_images`` (area
  averaged to the model's size) -> ``{"text": [N strings]}``, generated after the card's prompt with the card's
  ``generation`` settings (greedy or beam search).

``prepare`` runs on the caller's thread (it validates; a bad input never reaches a batch) and ``forward``
on the merged batch: every output's first dimension is the sample.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from shared.errors import InvalidArgument
from shared.modelcard import ModelCard
from shared.preprocess import Preprocessor

PROBABILITIES = "probabilities"
FUTURE_POSITION = "future_position"
TEXT = "text"


class Signature:
    """How one loaded model is fed and read."""

    outputs: ClassVar[tuple[str, ...]]
    # Whether the outputs hold class probabilities (servers then also give the top class names).
    classifies: ClassVar[bool] = True

    def __init__(self, card: ModelCard, module: torch.nn.Module):
        self.card, self.module = card, module
        self.temperature = float(card.temperature)

    def prepare(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 input -> the float batch the module takes."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward(self.prepare(raw))

    def check(self, out: dict, n: int) -> None:
        """That ``out`` (of a batch of ``n``) is what the card promises: a model whose card lies fails to load."""
        probs = out[PROBABILITIES]
        if probs.shape != (n, len(self.card.classes)):
            raise InvalidArgument(f"model {self.card.name}:{self.card.version} outputs {list(probs.shape)} for a "
                                  f"batch of {n}, but its card lists {len(self.card.classes)} classes")

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        # The card's temperature (fitted on validation; 1.0 when none) calibrates the probabilities.
        return torch.softmax(logits.float() / self.temperature, dim=1)


class ClassificationSignature(Signature):
    outputs = (PROBABILITIES,)

    def __init__(self, card: ModelCard, module: torch.nn.Module):
        super().__init__(card, module)
        self.preprocessor = Preprocessor.from_card(card)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.card.input_size)

    def prepare(self, raw: torch.Tensor) -> torch.Tensor:
        return self.preprocessor(raw)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return {PROBABILITIES: self._probabilities(self.module(x))}


class TrajectorySignature(Signature):
    outputs = (PROBABILITIES, FUTURE_POSITION)

    @property
    def clip_shape(self) -> tuple[int, ...]:
        return tuple(self.module.clip_shape)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.module.input_shape)

    def prepare(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.dtype != torch.uint8 or tuple(raw.shape[1:]) != self.clip_shape:
            raise InvalidArgument(f"videos must be uint8 [N, {', '.join(map(str, self.clip_shape))}], got "
                                  f"{raw.dtype} {list(raw.shape)}")
        if raw.shape[0] == 0:
            raise InvalidArgument("videos has an empty batch")
        return self.module.prepare(raw)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = self.module(x)
        return {PROBABILITIES: self._probabilities(out["logits"]),
                FUTURE_POSITION: out["future_position"].float()}


class CaptioningSignature(Signature):
    outputs = (TEXT,)
    classifies = False
    GENERATION_KEYS = frozenset({"max_new_tokens", "num_beams", "length_penalty", "prompt"})

    def __init__(self, card: ModelCard, module: torch.nn.Module):
        super().__init__(card, module)
        unknown = set(card.generation) - self.GENERATION_KEYS
        if unknown or not card.generation.get("prompt"):
            raise InvalidArgument(f"model {card.name}: the card's generation settings need a prompt and only "
                                  f"{sorted(self.GENERATION_KEYS)}, got {sorted(card.generation)}")
        self.generation = dict(card.generation)
        self.prompt = str(self.generation.pop("prompt"))

    @property
    def image_size(self) -> int:
        return int(self.module.image_size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def prepare(self, raw: torch.Tensor) -> torch.Tensor:
        from shared.models.captioner import preprocess_images

        if raw.dim() != 4 or raw.shape[0] == 0:
            raise InvalidArgument(f"images must be uint8 [N, 3, H, W] with N >= 1, got {list(raw.shape)}")
        return preprocess_images(raw, self.image_size)

    def forward(self, x: torch.Tensor) -> dict[str, list[str]]:
        with torch.inference_mode():
            return {TEXT: self.module.describe(x, [self.prompt] * x.shape[0], **self.generation)}

    def check(self, out: dict, n: int) -> None:
        if len(out[TEXT]) != n:
            raise InvalidArgument(f"model {self.card.name}:{self.card.version} gave {len(out[TEXT])} texts "
                                  f"for a batch of {n}")


SIGNATURES: dict[str, type[Signature]] = {"classification": ClassificationSignature,
                                          "trajectory": TrajectorySignature, "captioning": CaptioningSignature}


def signature_for(card: ModelCard, module: torch.nn.Module) -> Signature:
    return SIGNATURES[card.task](card, module)
