"""Dynamic int8 quantisation, one implementation: the benchmark measures exactly what ``--quantize`` serves.

Weights of every linear layer become int8 and activations are quantised per call. Convolutions have no
dynamic-quantised kernel in torch, so they stay fp32: a conv-only network's int8 size is its fp32 size.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def _plain_linears(model: nn.Module) -> int:
    """Turn nn.Linear subclasses that compute exactly nn.Linear's forward into nn.Linear, in place.

    quantize_dynamic matches module types exactly, so timm's ``Linear`` (the classifier of MobileNetV3 and
    EfficientNet) would silently stay fp32. MultiheadAttention's out_proj is left alone: MHA reads its
    ``weight`` directly, which a quantized module no longer has.
    """
    from timm.layers import Linear as TimmLinear  # overrides forward only for TorchScript
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child)
            if (isinstance(child, nn.Linear) and kind is not nn.Linear
                    and not isinstance(child, NonDynamicallyQuantizableLinear)
                    and (kind is TimmLinear or kind.forward is nn.Linear.forward)):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
                swapped += 1
    return swapped


def quantize_int8(model: nn.Module) -> tuple[nn.Module, int]:
    """An int8 copy of ``model`` on the CPU in eval mode (``model`` itself is untouched) and the number of
    linear layers quantised."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear
    from torch.ao.quantization import quantize_dynamic

    clone = copy.deepcopy(model).cpu().eval()
    _plain_linears(clone)
    with warnings.catch_warnings():
        # torch flags torch.ao quantisation as deprecated in favour of torchao (not a dependency); silenced so
        # a crash's stderr tail, which the benchmark runner reports, shows the crash and not this.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qmodel = quantize_dynamic(clone, {nn.Linear}, dtype=torch.qint8)
    return qmodel, sum(isinstance(m, DynLinear) for m in qmodel.modules())
