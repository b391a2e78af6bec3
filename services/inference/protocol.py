"""The Open Inference Protocol (KServe v2) wire format <-> tensors, for the inference servicer.

What a model takes and gives follows from its card's task (``shared.predict``).

Image classifiers take exactly one input per request, which reaches the model as one float NCHW batch at its
input size:
- ``images``  UINT8 [N, H, W, C], any height/width, 1, 3 or 4 channels: turned into the model's input by
  the model's ``shared.preprocess.Preprocessor`` (channels matched, normalised, resized);
- ``tensor``  FP32 [N, C, H, W] exactly the model's input size, already preprocessed: used untouched
  (zero-copy from the request bytes);
- ``encoded`` BYTES [N], one encoded PNG/JPEG/... image per element: decoded with PIL at the model's size,
  then as ``images``.
Tensors travel in ``raw_input_contents``; typed ``contents`` are accepted too.

Bounds, checked from the shapes before anything is decoded or allocated: a request carries at most the
model's ``max_batch_size`` samples (as Triton refuses larger ones; clients split), an encoded image at most
``MAX_DECODED_PIXELS`` (read from its header), and ``tensor`` values must be finite.

Trajectory models take ``videos`` UINT8 [N, cameras, frames, C, H, W], exactly the card's ``clip_size``
(``[-1, 4, 32, 3, 64, 64]`` for the rendered dataset), prepared by the model's own ``prepare``.

Captioning models take ``images`` UINT8 [N, H, W, 3] (any size) or ``encoded`` BYTES [N] (PNG/JPEG/...,
decoded to RGB and area-averaged to the model's size), and give ``text`` BYTES [N]: one UTF-8 description per
image, generated with the card's ``generation`` settings.

Outputs: ``probabilities`` FP32 [N, classes] and ``labels`` BYTES [N] (top-1 class name), or [N, k] when
the requested ``labels`` output carries the parameter ``top_k``; trajectory models add ``future_position``
FP32 [N, 3] (x, y, z in world units). Always in ``raw_output_contents``.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from shared.bytes_tensor import deserialize_bytes_tensor, serialize_bytes_tensor
from shared.errors import InvalidArgument
from shared.pb import inference_pb2 as pb
from shared.predict import FUTURE_POSITION, PROBABILITIES, TEXT, Signature
from shared.preprocess import Preprocessor

# The request's raw bytes are immutable and nothing downstream writes into an input tensor, so the
# zero-copy view over them is safe; torch would otherwise warn on every request.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
warnings.filterwarnings("ignore", message="The given buffer is not writable")

INPUT_IMAGES = "images"
INPUT_TENSOR = "tensor"
INPUT_ENCODED = "encoded"
INPUT_VIDEOS = "videos"
# What each task takes on the wire (ModelCard.task).
WIRE_INPUTS = {
    "classification": {INPUT_IMAGES: "UINT8", INPUT_TENSOR: "FP32", INPUT_ENCODED: "BYTES"},
    "trajectory": {INPUT_VIDEOS: "UINT8"},
    "captioning": {INPUT_IMAGES: "UINT8", INPUT_ENCODED: "BYTES"},
}
OUTPUT_PROBS = PROBABILITIES
OUTPUT_LABELS = "labels"
OUTPUT_POSITION = FUTURE_POSITION
OUTPUT_TEXT = TEXT
_NP_DTYPES = {"UINT8": np.uint8, "FP32": np.dtype("<f4")}
_RANKS = {INPUT_IMAGES: (4,), INPUT_TENSOR: (4,), INPUT_VIDEOS: (6,), INPUT_ENCODED: (1, 2)}
# 40 megapixels: a 13,000 x 13,000 PNG (169 MP, a few KB on the wire) took ~0.5 CPU-s to decode.
MAX_DECODED_PIXELS = 40_000_000


# ---------------------------------------------------------------------------------------------- parameters

def int_param(p: pb.InferParameter, what: str) -> int:
    kind = p.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(p, kind))
    if kind == "string_param" and p.string_param.strip().isdigit():
        return int(p.string_param)
    raise InvalidArgument(f"{what} must be an integer parameter")


def repository_params(params) -> dict[str, object]:
    """A repository request's parameters (``map<string, ModelRepositoryParameter>``) as plain values, the form
    the data plane takes from either wire."""
    return {key: getattr(p, p.WhichOneof("parameter_choice")) for key, p in params.items()
            if p.WhichOneof("parameter_choice") is not None}


# ---------------------------------------------------------------------------------------------- inputs

def element_count(name: str, shape: list[int]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)  # Python ints: a product past int64 is a bad shape, not an overflow


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A numeric input's raw bytes as an array of ``shape``, checking the byte count (no copy)."""
    dtype = np.dtype(_NP_DTYPES[datatype])
    count = element_count(name, shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(f"input {name!r}: {len(raw)} raw bytes, but {datatype} of shape {list(shape)} "
                              f"needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _blob_count(shape: list[int]) -> int:
    if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        if shape[0] < 1:
            raise InvalidArgument(f"input {INPUT_ENCODED!r} has an empty batch")
        return shape[0]
    raise InvalidArgument(f"input {INPUT_ENCODED!r} must have shape [N] or [N, 1], got {shape}")


def _from_contents(inp, shape: list[int]) -> np.ndarray | list[bytes]:
    """Typed ``contents`` (the non-raw form): UINT8 travels in uint_contents, FP32 in fp32_contents."""
    c = inp.contents
    if inp.name == INPUT_ENCODED:
        blobs = list(c.bytes_contents)
        if len(blobs) != _blob_count(shape):
            raise InvalidArgument(f"input {inp.name!r}: {len(blobs)} bytes_contents for shape {shape}")
        return blobs
    if inp.name in (INPUT_IMAGES, INPUT_VIDEOS):
        values = np.asarray(c.uint_contents, dtype=np.uint32)
        if values.size and values.max() > 255:
            raise InvalidArgument(f"input {inp.name!r}: UINT8 contents hold values above 255")
        values = values.astype(np.uint8)
    else:
        values = np.asarray(c.fp32_contents, dtype=np.float32)
    count = element_count(inp.name, shape)
    if values.size != count:
        raise InvalidArgument(f"input {inp.name!r}: {values.size} values in contents, shape {shape} needs {count}")
    return values.reshape(shape)


def _tensor_batch(arr: np.ndarray, pre: Preprocessor) -> torch.Tensor:
    expected = (pre.channels, pre.height, pre.width)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != expected:
        raise InvalidArgument(f"input {INPUT_TENSOR!r} must be FP32 [N, {', '.join(map(str, expected))}] "
                              f"(already preprocessed), got shape {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise InvalidArgument(f"input {INPUT_TENSOR!r} has an empty batch")
    x = torch.from_numpy(arr)
    # A NaN or inf input gives NaN probabilities and an arbitrary label: refuse it rather than answer that.
    bad = x.numel() - int(torch.isfinite(x).sum())
    if bad:
        raise InvalidArgument(f"input {INPUT_TENSOR!r} holds {bad} non-finite value(s) (NaN or inf)")
    return x


def _image_batch(arr: np.ndarray, pre: Preprocessor) -> torch.Tensor:
    if arr.ndim != 4 or arr.shape[3] not in (1, 3, 4):
        raise InvalidArgument(f"input {INPUT_IMAGES!r} must be UINT8 [N, H, W, C] with C in 1, 3, 4, "
                              f"got shape {list(arr.shape)}")
    if min(arr.shape[:3]) == 0:
        raise InvalidArgument(f"input {INPUT_IMAGES!r} has an empty dimension: {list(arr.shape)}")
    return pre(torch.from_numpy(arr).permute(0, 3, 1, 2))  # a view: NCHW strides over the NHWC bytes


def _decode_images(blobs: list[bytes], channels: int, height: int, width: int,
                   resample: Image.Resampling = Image.Resampling.BILINEAR) -> torch.Tensor:
    """Encoded images -> uint8 [N, C, H, W] at the given size."""
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(blobs), height, width, 1 if mode == "L" else 3), np.uint8)
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                # The header gives the size: an image too large to decode is refused before decoding.
                if im.width * im.height > MAX_DECODED_PIXELS:
                    raise InvalidArgument(f"input {INPUT_ENCODED!r} element {i} is {im.width}x{im.height} pixels; "
                                          f"at most {MAX_DECODED_PIXELS:,} pixels are decoded")
                im = im.convert(mode)
                if im.size != (width, height):
                    im = im.resize((width, height), resample)
                out[i] = np.asarray(im).reshape(height, width, -1)
        except InvalidArgument:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidArgument(f"input {INPUT_ENCODED!r} element {i} ({len(blob)} bytes) is not a "
                                  f"decodable image: {exc}") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _encoded_batch(blobs: list[bytes], pre: Preprocessor) -> torch.Tensor:
    return pre(_decode_images(blobs, pre.channels, pre.height, pre.width))


def _caption_batch(name: str, data: np.ndarray | list[bytes], signature: Signature) -> torch.Tensor:
    if name == INPUT_ENCODED:
        # Area averaging (BOX), as the captioner was trained: thin outlines stay grey lines instead of aliasing away.
        size = signature.image_size
        return signature.prepare(_decode_images(data, 3, size, size, Image.Resampling.BOX))
    if data.ndim != 4 or data.shape[3] != 3 or min(data.shape[:3]) == 0:
        raise InvalidArgument(f"input {INPUT_IMAGES!r} must be UINT8 [N, H, W, 3] (RGB), got shape {list(data.shape)}")
    return signature.prepare(torch.from_numpy(data).permute(0, 3, 1, 2))


def _check_batch(name: str, n: int, max_batch_size: int) -> None:
    if n > max_batch_size:
        raise InvalidArgument(f"input {name!r} holds {n:,} samples; this model takes at most {max_batch_size} per "
                              "request (its max_batch_size): split the batch")


def decode_input(request: pb.ModelInferRequest, signature: Signature, max_batch_size: int) -> torch.Tensor:
    """The request's one input as the batch the model takes (see the module docstring)."""
    task = signature.card.task
    datatypes = WIRE_INPUTS[task]
    if len(request.inputs) != 1:
        raise InvalidArgument(f"send exactly one input ({', '.join(f'{k} {v}' for k, v in datatypes.items())}), "
                              f"got {len(request.inputs)}")
    inp = request.inputs[0]
    expected = datatypes.get(inp.name)
    if expected is None:
        raise InvalidArgument(f"unknown input {inp.name!r}: this model takes {', '.join(datatypes)}")
    if inp.datatype != expected:
        raise InvalidArgument(f"input {inp.name!r} must be {expected}, got datatype {inp.datatype!r}")
    shape = list(inp.shape)
    if len(shape) in _RANKS[inp.name]:  # a wrong rank gets its own message below
        _check_batch(inp.name, shape[0], max_batch_size)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
        if inp.HasField("contents"):
            raise InvalidArgument(f"input {inp.name!r} has both contents and raw_input_contents")
        raw = request.raw_input_contents[0]
        data = deserialize_bytes_tensor(raw, _blob_count(shape)) if inp.name == INPUT_ENCODED \
            else tensor_from_raw(inp.name, expected, shape, raw)
    else:
        data = _from_contents(inp, shape)
    if task == "trajectory":
        return signature.prepare(torch.from_numpy(data))
    if task == "captioning":
        return _caption_batch(inp.name, data, signature)
    pre = signature.preprocessor
    if inp.name == INPUT_ENCODED:
        return _encoded_batch(data, pre)
    return _tensor_batch(data, pre) if inp.name == INPUT_TENSOR else _image_batch(data, pre)


# ---------------------------------------------------------------------------------------------- outputs

def output_names(signature: Signature) -> tuple[str, ...]:
    return (*signature.outputs, OUTPUT_LABELS) if signature.classifies else signature.outputs


def requested_outputs(request: pb.ModelInferRequest, signature: Signature) -> dict[str, int]:
    """Output name -> top_k (labels only; 0 = top-1 as [N]). All outputs when none are named."""
    names = output_names(signature)
    if not request.outputs:
        return dict.fromkeys(names, 0)
    num_classes = len(signature.card.classes)
    out: dict[str, int] = {}
    for o in request.outputs:
        if o.name not in names:
            raise InvalidArgument(f"unknown output {o.name!r}: this model has {', '.join(names)}")
        top_k = 0
        if o.name == OUTPUT_LABELS and "top_k" in o.parameters:
            top_k = int_param(o.parameters["top_k"], "output 'labels' parameter top_k")
            if top_k < 1:
                raise InvalidArgument(f"top_k must be >= 1, got {top_k}")
            top_k = min(top_k, num_classes)
        out[o.name] = top_k
    return out


def encode_response(request: pb.ModelInferRequest, name: str, version: int, classes: list[str],
                    results: dict[str, torch.Tensor], outputs: dict[str, int]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=str(version), id=request.id)
    for output, top_k in outputs.items():
        value = results.get(output)
        if isinstance(value, list):  # text: UTF-8 elements of a BYTES tensor
            response.outputs.add(name=output, datatype="BYTES", shape=[len(value)])
            response.raw_output_contents.append(serialize_bytes_tensor([t.encode() for t in value]))
            continue
        if output != OUTPUT_LABELS:
            value = results[output]
            response.outputs.add(name=output, datatype="FP32", shape=list(value.shape))
            response.raw_output_contents.append(value.float().numpy().tobytes())
            continue
        probs = results[OUTPUT_PROBS]
        n = probs.shape[0]
        if top_k:
            idx, shape = torch.topk(probs, top_k, dim=1).indices, [n, top_k]
        else:
            idx, shape = probs.argmax(dim=1), [n]
        response.outputs.add(name=output, datatype="BYTES", shape=shape)
        names = [classes[i].encode() for i in idx.reshape(-1).tolist()]
        response.raw_output_contents.append(serialize_bytes_tensor(names))
    return response
