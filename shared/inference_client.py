"""Client of the inference service: classify images into top-k labels with confidences.

It speaks the plain Open Inference Protocol v2 (``inference.GRPCInferenceService``), so it works
against any server that exposes the same inputs/outputs; see ``services/inference/server.py``:
inputs ``images`` (UINT8 NHWC), ``tensor`` (FP32 NCHW, preprocessed) or ``encoded`` (BYTES, image files);
outputs ``probabilities`` (FP32) and ``labels`` (BYTES, top-k with the ``top_k`` parameter). Trajectory
models take ``videos`` (UINT8 [N, cameras, frames, C, H, W]) and add ``future_position`` (FP32 [N, 3]):
``infer_videos`` and ``predict_trajectory_files`` (sample files as ``trainyard datasets sample`` writes them).

``classify_files`` sends image files and folders in batches of encoded files, so images of different sizes
share a request and the server does the decoding and resizing (``trainyard predict`` is built on it); batches are
split to the model's max_batch_size, which ``model_config`` reports (Triton's ModelConfig), next to
``model_statistics`` (Triton's inference statistics).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from shared import errors
from shared.bytes_tensor import deserialize_bytes_tensor, serialize_bytes_tensor
from shared.grpc_client import channel
from shared.grpc_server import DEFAULT_MAX_MESSAGE_BYTES
from shared.pb import inference_pb2 as pb
from shared.pb import inference_pb2_grpc
from shared.settings import load_settings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_TYPED = {cls.code: cls for cls in (
    errors.InvalidArgument, errors.NotFound, errors.AlreadyExists, errors.FailedPrecondition,
    errors.ResourceExhausted, errors.Unavailable, errors.Cancelled, errors.Unimplemented, errors.IntegrityError,
    errors.Unauthenticated, errors.PermissionDenied,
)}


def _typed_error(exc: grpc.RpcError, address: str) -> errors.TrainyardError:
    """A gRPC failure as the matching typed error, carrying the server's message."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return errors.Unavailable(f"inference server {address} is unreachable or unavailable: {exc.details()}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.Unavailable(f"inference server {address} did not answer in time: {exc.details()}")
    err = _TYPED.get(code, errors.TrainyardError)(f"{exc.details()}")
    if type(err) is errors.TrainyardError:
        err.code = code
    return err


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, best first, with their probabilities."""

    source: str
    top: list[tuple[str, float]]
    model: str
    version: str

    @property
    def label(self) -> str:
        return self.top[0][0]

    @property
    def confidence(self) -> float:
        return self.top[0][1]


@dataclass(frozen=True)
class InferResult:
    probabilities: np.ndarray  # [N, classes] float32
    labels: list[list[str]]  # [N][k], best first
    model: str
    version: str


@dataclass(frozen=True)
class TrajectoryResult:
    probabilities: np.ndarray  # [N, classes] float32
    labels: list[str]  # [N] top-1 class
    future_position: np.ndarray  # [N, 3] float32, world units
    model: str
    version: str


def read_trajectory_samples(path: str | Path) -> np.ndarray:
    """uint8 clips [N, cameras, frames, C, H, W] from a ``.npy`` array or the ``video`` of a ``.npz`` sample
    file; one clip without the batch axis becomes a batch of one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as loaded:
            video = loaded["video"] if isinstance(loaded, np.lib.npyio.NpzFile) else None
    except (OSError, ValueError, KeyError) as exc:
        raise errors.InvalidArgument(f"{path}: not a trajectory sample file (.npz with 'video', or .npy): "
                                     f"{exc}") from None
    if video is None:
        video = np.load(path, allow_pickle=False)
    if video.dtype != np.uint8 or video.ndim not in (5, 6):
        raise errors.InvalidArgument(f"{path}: expected uint8 clips [N,] cameras, frames, C, H, W; got "
                                     f"{video.dtype} {list(video.shape)}")
    return video[None] if video.ndim == 5 else video


def _image_request(model: str, version, batch: np.ndarray | Sequence[bytes], allow_tensor: bool
                   ) -> pb.ModelInferRequest:
    """A ModelInfer request carrying uint8 images [N, H, W, C], float32 preprocessed tensors [N, C, H, W] (when
    ``allow_tensor``) or encoded image files."""
    req = pb.ModelInferRequest(model_name=model, model_version=_v(version))
    if isinstance(batch, np.ndarray):
        if batch.dtype == np.uint8 and batch.ndim == 4:
            name, datatype = "images", "UINT8"
        elif allow_tensor and batch.dtype == np.float32 and batch.ndim == 4:
            name, datatype = "tensor", "FP32"
        else:
            expected = "uint8 [N, H, W, C] or float32 [N, C, H, W]" if allow_tensor else "uint8 [N, H, W, C]"
            raise errors.InvalidArgument(f"batch must be {expected}, got {batch.dtype} {list(batch.shape)}")
        req.inputs.add(name=name, datatype=datatype, shape=list(batch.shape))
        req.raw_input_contents.append(np.ascontiguousarray(batch).tobytes())
    else:
        blobs = list(batch)
        req.inputs.add(name="encoded", datatype="BYTES", shape=[len(blobs)])
        req.raw_input_contents.append(serialize_bytes_tensor(blobs))
    return req


class InferenceClient:
    """``with InferenceClient("127.0.0.1:50055") as c: c.classify("mnist", images, top_k=3)``.

    Failures raise the typed errors of ``shared.errors`` (NotFound for an unknown model, ...).
    ``token`` (default: the TRAINYARD_REPOSITORY_TOKEN setting) is sent with load/unload only.
    """

    def __init__(self, address: str, *, timeout: float = 60.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 token: str | None = None):
        self.address = address
        self.timeout = timeout
        self._token = token if token is not None else load_settings().repository_token
        self._channel = channel(address, max_message_bytes)
        self._stub = inference_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, metadata: tuple[tuple[str, str], ...] | None = None):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise _typed_error(exc, self.address) from None

    # ---- server and repository

    def server_live(self) -> bool:
        return self._call("ServerLive", pb.ServerLiveRequest()).live

    def server_ready(self) -> bool:
        return self._call("ServerReady", pb.ServerReadyRequest()).ready

    def model_ready(self, model: str, version: str | int | None = None) -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=model, version=_v(version))).ready

    def model_metadata(self, model: str, version: str | int | None = None) -> pb.ModelMetadataResponse:
        return self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=_v(version)))

    def model_config(self, model: str, version: str | int | None = None) -> pb.ModelConfig:
        """What the server applies to the model (Triton's ModelConfig): max_batch_size, queue delay, tensors."""
        return self._call("ModelConfig", pb.ModelConfigRequest(name=model, version=_v(version))).config

    def model_statistics(self, model: str = "", version: str | int | None = None) -> list[pb.ModelStatistics]:
        """Triton's inference statistics of every loaded model (no name), every loaded version of ``model``, or one."""
        request = pb.ModelStatisticsRequest(name=model, version=_v(version))
        return list(self._call("ModelStatistics", request).model_stats)

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        resp = self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready_only))
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in resp.models]

    def load_model(self, model: str, version: str | int | None = None, alias: str | None = None) -> None:
        """Load ``model`` on the server: ``version``, the version its MLflow registry ``alias`` names
        (e.g. champion), or the newest published one."""
        params = _vparam(version)
        if alias:
            params["alias"] = pb.ModelRepositoryParameter(string_param=alias)
        self._call("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=model, parameters=params),
                   self._authorization())

    def unload_model(self, model: str, version: str | int | None = None) -> None:
        request = pb.RepositoryModelUnloadRequest(model_name=model, parameters=_vparam(version))
        self._call("RepositoryModelUnload", request, self._authorization())

    def _authorization(self) -> tuple[tuple[str, str], ...] | None:
        # The server refuses load/unload without it, with a message that says what to set.
        return (("authorization", f"Bearer {self._token}"),) if self._token else None

    # ---- inference

    def infer(self, model: str, batch: np.ndarray | Sequence[bytes], version: str | int | None = None,
              top_k: int = 1) -> InferResult:
        """One ModelInfer call. ``batch``: uint8 [N, H, W, C] images, float32 [N, C, H, W] preprocessed
        tensors, or a list of encoded image files (bytes)."""
        req = _image_request(model, version, batch, allow_tensor=True)
        req.outputs.add(name="probabilities")
        labels = req.outputs.add(name="labels")
        labels.parameters["top_k"].int64_param = max(1, int(top_k))
        resp = self._call("ModelInfer", req)
        out = {o.name: (o, raw) for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}
        if set(out) != {"probabilities", "labels"}:
            raise errors.FailedPrecondition(f"server answered outputs {sorted(out)}, expected probabilities, labels")
        p_meta, p_raw = out["probabilities"]
        probs = np.frombuffer(p_raw, dtype="<f4").reshape(list(p_meta.shape))
        l_meta, l_raw = out["labels"]
        names = [b.decode() for b in deserialize_bytes_tensor(l_raw, int(np.prod(l_meta.shape)))]
        k = int(l_meta.shape[1]) if len(l_meta.shape) == 2 else 1
        return InferResult(probs, [names[i:i + k] for i in range(0, len(names), k)], resp.model_name,
                           resp.model_version)

    def infer_videos(self, model: str, videos: np.ndarray, version: str | int | None = None) -> TrajectoryResult:
        """One ModelInfer call to a trajectory model: uint8 clips [N, cameras, frames, C, H, W]."""
        if videos.dtype != np.uint8 or videos.ndim != 6:
            raise errors.InvalidArgument(f"videos must be uint8 [N, cameras, frames, C, H, W], got {videos.dtype} "
                                         f"{list(videos.shape)}")
        req = pb.ModelInferRequest(model_name=model, model_version=_v(version))
        req.inputs.add(name="videos", datatype="UINT8", shape=list(videos.shape))
        req.raw_input_contents.append(np.ascontiguousarray(videos).tobytes())
        for name in ("probabilities", "labels", "future_position"):
            req.outputs.add(name=name)
        resp = self._call("ModelInfer", req)
        out = {o.name: (o, raw) for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}
        if set(out) != {"probabilities", "labels", "future_position"}:
            raise errors.FailedPrecondition(f"server answered outputs {sorted(out)}, expected probabilities, "
                                            "labels, future_position")
        (p_meta, p_raw), (l_meta, l_raw), (f_meta, f_raw) = (out[k] for k in ("probabilities", "labels",
                                                                               "future_position"))
        return TrajectoryResult(np.frombuffer(p_raw, dtype="<f4").reshape(list(p_meta.shape)),
                                [b.decode() for b in deserialize_bytes_tensor(l_raw, int(np.prod(l_meta.shape)))],
                                np.frombuffer(f_raw, dtype="<f4").reshape(list(f_meta.shape)),
                                resp.model_name, resp.model_version)

    def describe(self, model: str, batch: np.ndarray | Sequence[bytes], version: str | int | None = None
                 ) -> list[str]:
        """One ModelInfer call to a captioning model: uint8 RGB images [N, H, W, 3] or encoded image files
        (bytes); the model's ``text`` output (a BYTES tensor) as one string per image."""
        req = _image_request(model, version, batch, allow_tensor=False)
        req.outputs.add(name="text")
        resp = self._call("ModelInfer", req)
        if [o.name for o in resp.outputs] != ["text"]:
            raise errors.FailedPrecondition(f"server answered outputs {[o.name for o in resp.outputs]}, expected text")
        meta, raw = resp.outputs[0], resp.raw_output_contents[0]
        return [b.decode() for b in deserialize_bytes_tensor(raw, int(np.prod(meta.shape)))]

    def classify(self, model: str, images: Iterable, version: str | int | None = None, top_k: int = 5,
                 batch_size: int = 32, sources: Sequence[str] | None = None) -> list[Prediction]:
        """Top-k (label, confidence) for each image, sent ``batch_size`` images per request (at most the model's
        max_batch_size, which the server refuses to exceed).

        An image is a uint8 array (H, W) or (H, W, C), a PIL image, encoded file bytes, or a file path.
        Encoded images and arrays of different sizes may be mixed; each request carries one kind.
        """
        if batch_size < 1:
            raise errors.InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        items = [_as_item(img) for img in images]
        if not items:
            raise errors.InvalidArgument("no images to classify")
        batch_size = min(batch_size, self._max_batch_size(model, version, batch_size))
        names = list(sources) if sources is not None else [str(i) for i in range(len(items))]
        results: list[Prediction | None] = [None] * len(items)
        for start in range(0, len(items), batch_size):
            chunk = range(start, min(start + batch_size, len(items)))
            # One request per kind/shape within the chunk: a UINT8 tensor needs one image size.
            groups: dict[object, list[int]] = {}
            for i in chunk:
                item = items[i]
                groups.setdefault("encoded" if isinstance(item, bytes) else item.shape, []).append(i)
            for key, idx in groups.items():
                batch = [items[i] for i in idx] if key == "encoded" else np.stack([items[i] for i in idx])
                res = self.infer(model, batch, version=version, top_k=top_k)
                # Labels come sorted by probability; so are the confidences, rank for rank.
                confidences = -np.sort(-res.probabilities, axis=1)
                for row, i in enumerate(idx):
                    top = [(lab, float(confidences[row, r])) for r, lab in enumerate(res.labels[row])]
                    results[i] = Prediction(names[i], top, res.model, res.version)
        return results

    def _max_batch_size(self, model: str, version: str | int | None, default: int) -> int:
        try:
            return self.model_config(model, version).max_batch_size or default
        except errors.Unimplemented:  # a server without the model-configuration extension
            return default

    def classify_files(self, model: str, paths: Iterable[str | Path], version: str | int | None = None,
                       top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Files and folders (their images, sorted, not recursive) -> one Prediction per image file."""
        files = expand_image_paths(paths)
        return self.classify(model, files, version=version, top_k=top_k, batch_size=batch_size,
                             sources=[str(f) for f in files])


def _v(version: str | int | None) -> str:
    return "" if version is None else str(version)


def _vparam(version: str | int | None) -> dict:
    return {} if version is None else {"version": pb.ModelRepositoryParameter(string_param=str(version))}


def _as_item(img) -> bytes | np.ndarray:
    """An image as encoded bytes or an (H, W, C) uint8 array."""
    if isinstance(img, (bytes, bytearray, memoryview)):
        return bytes(img)
    if isinstance(img, (str, Path)):
        path = Path(img)
        if not path.is_file():
            raise errors.NotFound(f"image file {path} does not exist")
        return path.read_bytes()
    if hasattr(img, "convert") and hasattr(img, "mode"):  # a PIL image
        img = np.asarray(img.convert("L" if img.mode in ("1", "L", "I", "F", "I;16") else "RGB"))
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim not in (2, 3):
            raise errors.InvalidArgument(f"an image array must be uint8 (H, W) or (H, W, C), got {img.dtype} "
                                         f"{list(img.shape)}")
        return img[:, :, None] if img.ndim == 2 else img
    raise errors.InvalidArgument(f"cannot send {type(img).__name__} as an image: pass an array, PIL image, "
                                 "bytes or a path")


def expand_image_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Image files as given, and the image files directly inside given folders (sorted)."""
    paths = [Path(p) for p in paths]
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise errors.NotFound(f"{p} is neither an image file nor a folder")
    if not out:
        raise errors.InvalidArgument(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return out
