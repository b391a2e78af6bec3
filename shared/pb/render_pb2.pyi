from . import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RenderRequest(_message.Message):
    __slots__ = ("out", "count", "seed", "workers", "resume", "max_failures", "cad", "cad_synth", "trajectories", "logos", "digits", "cifar_synth")
    OUT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CAD_FIELD_NUMBER: _ClassVar[int]
    CAD_SYNTH_FIELD_NUMBER: _ClassVar[int]
    TRAJECTORIES_FIELD_NUMBER: _ClassVar[int]
    LOGOS_FIELD_NUMBER: _ClassVar[int]
    DIGITS_FIELD_NUMBER: _ClassVar[int]
    CIFAR_SYNTH_FIELD_NUMBER: _ClassVar[int]
    out: str
    count: int
    seed: int
    workers: int
    resume: bool
    max_failures: str
    cad: CadRender
    cad_synth: CadSynth
    trajectories: TrajectoryRender
    logos: LogoRender
    digits: DigitRender
    cifar_synth: CifarSynthRender
    def __init__(self, out: _Optional[str] = ..., count: _Optional[int] = ..., seed: _Optional[int] = ..., workers: _Optional[int] = ..., resume: _Optional[bool] = ..., max_failures: _Optional[str] = ..., cad: _Optional[_Union[CadRender, _Mapping]] = ..., cad_synth: _Optional[_Union[CadSynth, _Mapping]] = ..., trajectories: _Optional[_Union[TrajectoryRender, _Mapping]] = ..., logos: _Optional[_Union[LogoRender, _Mapping]] = ..., digits: _Optional[_Union[DigitRender, _Mapping]] = ..., cifar_synth: _Optional[_Union[CifarSynthRender, _Mapping]] = ...) -> None: ...

class CadRender(_message.Message):
    __slots__ = ("input", "image_size")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    input: str
    image_size: int
    def __init__(self, input: _Optional[str] = ..., image_size: _Optional[int] = ...) -> None: ...

class CadSynth(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrajectoryRender(_message.Message):
    __slots__ = ("shard_size",)
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    shard_size: int
    def __init__(self, shard_size: _Optional[int] = ...) -> None: ...

class LogoRender(_message.Message):
    __slots__ = ("image_size", "val_per_class", "test_per_class")
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    VAL_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    TEST_PER_CLASS_FIELD_NUMBER: _ClassVar[int]
    image_size: int
    val_per_class: int
    test_per_class: int
    def __init__(self, image_size: _Optional[int] = ..., val_per_class: _Optional[int] = ..., test_per_class: _Optional[int] = ...) -> None: ...

class DigitRender(_message.Message):
    __slots__ = ("test_count", "gzip")
    TEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    GZIP_FIELD_NUMBER: _ClassVar[int]
    test_count: int
    gzip: bool
    def __init__(self, test_count: _Optional[int] = ..., gzip: _Optional[bool] = ...) -> None: ...

class CifarSynthRender(_message.Message):
    __slots__ = ("test_count",)
    TEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    test_count: int
    def __init__(self, test_count: _Optional[int] = ...) -> None: ...

class DescribeDatasetRequest(_message.Message):
    __slots__ = ("location",)
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    location: str
    def __init__(self, location: _Optional[str] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("location", "kind", "items", "files", "bytes", "generator_version", "seed", "meta_json")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    location: str
    kind: str
    items: int
    files: int
    bytes: int
    generator_version: str
    seed: int
    meta_json: str
    def __init__(self, location: _Optional[str] = ..., kind: _Optional[str] = ..., items: _Optional[int] = ..., files: _Optional[int] = ..., bytes: _Optional[int] = ..., generator_version: _Optional[str] = ..., seed: _Optional[int] = ..., meta_json: _Optional[str] = ...) -> None: ...
