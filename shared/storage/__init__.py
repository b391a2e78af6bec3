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
from shared.storage.lease import Lease, LeaseConflict
from shared.storage.local import LocalStore
from shared.storage.manifest import MANIFEST_NAME, FileEntry, Manifest
from shared.storage.s3 import S3Store

__all__ = [
    "ArtifactStore",
    "DATASETS_ROOT",
    "FileEntry",
    "Lease",
    "LeaseConflict",
    "LocalStore",
    "MANIFEST_NAME",
    "Manifest",
    "S3Store",
    "dataset_source",
    "is_url",
    "open_location",
    "open_output",
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


# The one area of the platform's store that render and convert may write; models/, runs/, studies/ are
# written by the platform's own services only.
DATASETS_ROOT = "datasets"


def open_output(location: str | os.PathLike, settings: Settings | None = None) -> tuple[ArtifactStore, str]:
    """The store and prefix a dataset *output* goes to, confined: inside the platform's store
    (TRAINYARD_STORE) only under ``datasets/<name>``; elsewhere only as a local path (a plain path or
    ``file://``). ``store:datasets/<name>`` names the store's area directly. A ``..`` segment is refused
    before anything resolves, and a local path is judged where it resolves to (symlinks followed), so no
    spelling reaches ``models/`` or ``runs/``.
    """
    settings = settings or load_settings()
    location = os.fspath(location)
    if not isinstance(location, str) or not location.strip():
        raise InvalidArgument("the output location is empty: give a local path, file://…, s3://… or store:…")
    if ".." in location.replace("\\", "/").split("/"):
        raise InvalidArgument(f"output location {location!r} contains '..': spell the folder without it")
    store_url = settings.store_url.rstrip("/")
    if location.startswith("store:"):
        location = f"{store_url}/{location[len('store:'):].strip('/')}"
    target_url, prefix = split_location(location)
    target = f"{target_url.rstrip('/')}/{prefix}"
    area = _store_area(store_url, target)
    if area is None:
        if target.startswith("s3://"):
            raise InvalidArgument(
                f"output location {location!r} is outside the artifact store: object-store outputs go under "
                f"{store_url}/{DATASETS_ROOT}/<name> (TRAINYARD_STORE), or give a local path")
        return open_store(target_url, settings), prefix
    parts = area.split("/") if area else []
    if len(parts) < 2 or parts[0] != DATASETS_ROOT:
        raise InvalidArgument(
            f"output location {location!r} is inside the artifact store {store_url} but not in its datasets "
            f"area: write to {store_url}/{DATASETS_ROOT}/<name> (store:{DATASETS_ROOT}/<name>); "
            f"models/, runs/ and studies/ are the platform's own")
    return open_store(target_url, settings), prefix


def _store_area(store_url: str, target: str) -> str | None:
    """``target``'s key inside the store at ``store_url`` ("" for its root), or None when ``target`` lies
    outside it. A target that *contains* the store counts as its root: writing there could reach it."""
    if store_url.startswith("s3://") != target.startswith("s3://"):
        return None
    if store_url.startswith("s3://"):
        root, path = store_url[len("s3://"):].strip("/"), target[len("s3://"):].strip("/")
    else:
        root = str(Path(store_url.removeprefix("file://")).expanduser().resolve())
        path = target.removeprefix("file://")
    root, path = root.rstrip("/"), path.rstrip("/")
    if path == root or root.startswith(path + "/"):
        return ""
    return path[len(root) + 1:] if path.startswith(root + "/") else None


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
