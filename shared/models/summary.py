"""Layer-by-layer model summary (the parameter tables of the experiment logs), via forward hooks."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from shared.errors import InvalidArgument


@dataclass
class LayerRow:
    name: str
    type: str
    input_shape: list[int]
    output_shape: list[int]
    kernel: str
    params: int


@dataclass
class Summary:
    rows: list[LayerRow]
    total_params: int
    trainable_params: int
    input_size: list[int]
    output_shape: list[int]
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def non_trainable_params(self) -> int:
        return self.total_params - self.trainable_params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"non_trainable_params": self.non_trainable_params}

    def to_text(self) -> str:
        fmt = lambda shape: "x".join(str(d) for d in shape) if shape else "-"  # noqa: E731
        header = ("Layer (type)", "Input", "Output", "Kernel", "Params")
        body = [(f"{r.name} ({r.type})", fmt(r.input_shape), fmt(r.output_shape), r.kernel, f"{r.params:,}")
                for r in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(5)]
        line = lambda cols: "  ".join(  # noqa: E731
            c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True))).rstrip()
        rule = "-" * len(line(header))
        title = f"{self.model_name}  input {fmt(self.input_size)} -> output {fmt(self.output_shape)}"
        out = [title.strip(), rule, line(header), rule, *map(line, body), rule,
               f"Total params: {self.total_params:,}",
               f"Trainable params: {self.trainable_params:,}",
               f"Non-trainable params: {self.non_trainable_params:,}"]
        return "\n".join(out)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _shape(value: Any) -> list[int]:
    """Shape without the batch dimension of the first tensor in ``value``."""
    if isinstance(value, torch.Tensor):
        return list(value.shape[1:])
    if isinstance(value, (list, tuple)):
        for item in value:
            shape = _shape(item)
            if shape:
                return shape
    if isinstance(value, dict):
        return _shape(list(value.values()))
    return []


def _kernel(module: nn.Module) -> str:
    k = getattr(module, "kernel_size", None)
    if k is None:
        return "-"
    k = (k, k) if isinstance(k, int) else tuple(k)
    return "x".join(str(v) for v in k)


def model_summary(model: nn.Module, input_size: Sequence[int] = (1, 28, 28), name: str = "") -> Summary:
    """Run one dummy batch through ``model`` (in eval mode, no grad) and record every leaf module call.

    A leaf called twice gets two rows but its parameters count once; the totals always come from
    ``model.parameters()`` so parameters held directly by containers (e.g. position embeddings) count.
    """
    size = list(input_size)
    if not size or any(int(d) <= 0 for d in size):
        raise InvalidArgument(f"input size must be positive dims like 1x28x28, got {input_size!r}")
    rows: list[LayerRow] = []
    seen: set[int] = set()
    handles = []

    def hook(mod_name: str):
        def record(module: nn.Module, inputs, output) -> None:
            params = 0
            if id(module) not in seen:
                seen.add(id(module))
                params = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append(LayerRow(mod_name, type(module).__name__, _shape(inputs), _shape(output),
                                 _kernel(module), params))
        return record

    for mod_name, module in model.named_modules():
        if mod_name and not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(hook(mod_name)))
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(1, *size, device=device))
    except RuntimeError as exc:
        raise InvalidArgument(f"model does not accept input {'x'.join(map(str, size))}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Summary(rows=rows, total_params=count_params(model), trainable_params=count_params(model, True),
                   input_size=size, output_shape=_shape(out), model_name=name)
