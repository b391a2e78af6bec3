from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TinyLlavaRequest(_message.Message):
    __slots__ = ("cad_json", "images", "out", "split_file", "seed", "val_fraction")
    CAD_JSON_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FILE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    cad_json: str
    images: str
    out: str
    split_file: str
    seed: int
    val_fraction: float
    def __init__(self, cad_json: _Optional[str] = ..., images: _Optional[str] = ..., out: _Optional[str] = ..., split_file: _Optional[str] = ..., seed: _Optional[int] = ..., val_fraction: _Optional[float] = ...) -> None: ...

class ValidateRequest(_message.Message):
    __slots__ = ("path", "image_size")
    PATH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    path: str
    image_size: int
    def __init__(self, path: _Optional[str] = ..., image_size: _Optional[int] = ...) -> None: ...

class ValidationReport(_message.Message):
    __slots__ = ("ok", "records", "images", "problems", "text")
    OK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    records: int
    images: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    text: str
    def __init__(self, ok: _Optional[bool] = ..., records: _Optional[int] = ..., images: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ..., text: _Optional[str] = ...) -> None: ...

class IndexRequest(_message.Message):
    __slots__ = ("path", "out")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    path: str
    out: str
    def __init__(self, path: _Optional[str] = ..., out: _Optional[str] = ...) -> None: ...

class IndexResponse(_message.Message):
    __slots__ = ("index_location", "index_json")
    INDEX_LOCATION_FIELD_NUMBER: _ClassVar[int]
    INDEX_JSON_FIELD_NUMBER: _ClassVar[int]
    index_location: str
    index_json: str
    def __init__(self, index_location: _Optional[str] = ..., index_json: _Optional[str] = ...) -> None: ...
