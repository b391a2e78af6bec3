"""The artifact store: one interface over a local directory or an S3 bucket (MinIO).

``open_store(url)`` picks the backend from the URL; see ``ArtifactStore`` for the operations and
the publish-with-manifest contract.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.errors import InvalidArgument
from shared.settings import Settings, load_settings
from shared.storage.base import ArtifactStore, validate_key
from shared.storage.local import LocalStore
from shared.storage.manifest import MANIFEST_NAME, FileEntry, Manifest
from shared.storage.s3 import S3Store

__all__ = [
    "ArtifactStore",
    "FileEntry",
    "LocalStore",
    "MANIFEST_NAME",
    "Manifest",
    "S3Store",
    "dataset_source",
    "is_url",
    "open_location",
    "open_store",
    "split_location",
    "validate_key",
]


def open_store(
    url_or_path: str | os.PathLike | None = None, settings: Settings | None = None
) -> ArtifactStore:
    """Open ``file://dir``, a plain directory path, or ``s3://bucket/prefix``.

    With no argument the store is TRAINYARD_STORE (default ``$TRAINYARD_HOME/artifacts``). S3
    endpoint and credentials always come from the environment via ``shared.settings``.
    """
    settings = settings or load_settings()
    target = settings.store_url if url_or_path is None else url_or_path
    if isinstance(target, os.PathLike):
        return LocalStore(target)
    if not isinstance(target, str) or not target:
        raise InvalidArgument(f"store URL must be a non-empty string or path, got {target!r}")
    if target.startswith("s3://"):
        return S3Store.from_url(target, settings=settings)
    if target.startswith("file://"):
        return LocalStore(target[len("file://") :])
    if "://" in target:
        raise InvalidArgument(f"unsupported store URL {target!r}: use file://, s3:// or a local path")
    return LocalStore(Path(target))


def is_url(location: str) -> bool:
    """Whether ``location`` names a store by URL (file://, s3://) rather than a plain local path."""
    return "://" in location


def split_location(location: str) -> tuple[str, str]:
    """(store URL, prefix) for a dataset location: its last segment is the prefix in the store formed
    by the rest (``/data/digits`` -> ``file:///data``, ``digits``;
    ``s3://b/datasets/x`` -> ``s3://b/datasets``, ``x``)."""
    location = location.rstrip("/")
    if location.startswith("s3://"):
        bucket_and_key = location[len("s3://"):]
        if "/" not in bucket_and_key:
            raise InvalidArgument(f"{location}: name a folder inside the bucket, e.g. s3://bucket/datasets/x")
        parent, _, name = bucket_and_key.rpartition("/")
        return f"s3://{parent}", name
    path = location[len("file://"):] if location.startswith("file://") else location
    if not path or "://" in path:
        raise InvalidArgument(f"location {location!r}: use a local path, file://… or s3://bucket/prefix")
    path = str(Path(path).resolve())
    parent, _, name = path.rpartition("/")
    return f"file://{parent or '/'}", name


def open_location(location: str, settings: Settings | None = None) -> tuple[ArtifactStore, str]:
    """The store holding ``location`` and the prefix of ``location`` inside it (see split_location)."""
    store_url, prefix = split_location(location)
    return open_store(store_url, settings), prefix


def dataset_source(location: str, settings: Settings | None = None) -> tuple[str, str | None]:
    """(root, store URL or None) of a dataset a reader takes (see ``shared.data.resolve_source``).

    A local directory (a plain path or ``file://``) is read in place; ``s3://bucket/prefix`` and
    ``store:prefix`` (in the platform's TRAINYARD_STORE) name a published dataset, fetched and verified.
    """
    if location.startswith("store:"):
        key = location[len("store:"):].strip("/")
        if not key:
            raise InvalidArgument(f"{location!r} names no dataset: use store:<prefix>")
        store_url, prefix = split_location(f"{(settings or load_settings()).store_url.rstrip('/')}/{key}")
        return prefix, store_url
    if location.startswith("s3://"):
        store_url, prefix = split_location(location)
        return prefix, store_url
    if location.startswith("file://"):
        return location[len("file://"):], None
    if is_url(location):
        raise InvalidArgument(f"dataset location {location}: use a local path, file://, s3://bucket/prefix "
                              "or store:prefix")
    return location, None
