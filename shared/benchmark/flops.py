"""FLOPs of one forward pass, in the convention of timm's published GMACs (fvcore's).

torch's ``FlopCounterMode`` counts conv, mm/addmm/bmm/baddbmm and the CUDA attention kernels at 2 FLOPs per
multiply-accumulate. timm's published GMACs come from fvcore, which also counts scaled-dot-product attention
on CPU and gives normalisation layers a fixed per-element cost. Two things were missing from torch's registry
and made the 7 reference models miss timm's figures by up to 8%: CPU attention
(``aten._scaled_dot_product_flash_attention_for_cpu``, not registered at all, so ViT/DeiT lost their QK^T and
AV products) and the norm layers (MobileNetV3 / EfficientNet are BN-heavy: -5.8% / -3.6% without them).
``EXTRA_FLOP_FORMULAS`` adds both with fvcore's costs, so GMACs = FLOPs / 2 match timm within 1%.
Elementwise activations, adds, softmax and means (incl. squeeze-excite pools) are not counted, exactly as in
fvcore; ``FLOPs (G)`` is reported as 2 x GMACs.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

FLOPS_CONVENTION = (
    "MACs as timm/fvcore count them: 1 per multiply-accumulate in conv, linear, (b)mm and attention "
    "(QK^T and AV); batch norm 2/element (eval, affine), layer/group norm 5/element (affine), adaptive "
    "avg-pool 1/input element, upsampling 1 (nearest) or 4 (bilinear)/output element; activations, adds, "
    "softmax and means not counted. FLOPs = 2 x MACs."
)



def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _bn_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # native_batch_norm / _native_batch_norm_legit carry `training` as their first bool argument;
    # _native_batch_norm_legit_no_training has none, which is the eval case.
    training = next((a for a in args if isinstance(a, bool)), False)
    affine = weight_shape is not None
    per_element = (5 if affine else 4) if training else (2 if affine else 1)
    return 2 * per_element * _numel(input_shape)


def _layer_norm_flop(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * (5 if weight_shape is not None else 4) * _numel(input_shape)


def _group_norm_flop(input_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * (5 if weight_shape is not None else 4) * _numel(input_shape)


def _adaptive_pool_flop(input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(input_shape)


def _upsample_nearest_flop(*args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(out_shape)


def _upsample_linear_flop(*args, out_shape=None, **kwargs) -> int:
    return 2 * 4 * _numel(out_shape)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    wanted = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu_flop,
        "_scaled_dot_product_fused_attention_overrideable": _sdpa_cpu_flop,
        "native_batch_norm": _bn_flop,
        "_native_batch_norm_legit": _bn_flop,
        "_native_batch_norm_legit_no_training": _bn_flop,
        "cudnn_batch_norm": _bn_flop,
        "native_layer_norm": _layer_norm_flop,
        "native_group_norm": _group_norm_flop,
        "_adaptive_avg_pool2d": _adaptive_pool_flop,
        "_adaptive_avg_pool3d": _adaptive_pool_flop,
        "upsample_nearest2d": _upsample_nearest_flop,
        "upsample_bilinear2d": _upsample_linear_flop,
    }
    # Some ops only exist in some torch builds; register the ones this build has.
    return {getattr(aten, name): fn for name, fn in wanted.items() if hasattr(aten, name)}


EXTRA_FLOP_FORMULAS = _extra_formulas()


def counted_ops() -> list[str]:
    """Every forward aten op that contributes to the count (torch's own registry plus ours)."""
    registry = FlopCounterMode(custom_mapping=EXTRA_FLOP_FORMULAS).flop_registry
    return sorted(str(op) for op in registry if "backward" not in str(op))


def count_flops(model: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward pass of ``model`` on ``example`` (2 per MAC), total and per aten op."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        model(example)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items() if n}
    return int(counter.get_total_flops()), by_op
