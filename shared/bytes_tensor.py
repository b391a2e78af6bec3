"""BYTES tensors of the Open Inference Protocol in ``raw_input_contents`` / ``raw_output_contents``:
each element prefixed with its 4-byte little-endian length. The inference server and its client
both speak it."""
from __future__ import annotations

import struct
from collections.abc import Sequence

from shared.errors import InvalidArgument


def serialize_bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def deserialize_bytes_tensor(raw: bytes, count: int | None = None) -> list[bytes]:
    """Inverse of ``serialize_bytes_tensor``: no trailing bytes, and ``count`` elements when given."""
    items: list[bytes] = []
    view = memoryview(raw)
    pos = 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise InvalidArgument(f"BYTES tensor is truncated: a length prefix is cut off at byte {pos}")
        (size,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + size > len(view):
            raise InvalidArgument(f"BYTES tensor is truncated: element {len(items)} declares {size} bytes, "
                                  f"{len(view) - pos} remain")
        items.append(bytes(view[pos:pos + size]))
        pos += size
    if count is not None and len(items) != count:
        raise InvalidArgument(f"BYTES tensor holds {len(items)} elements but its shape says {count}")
    return items
