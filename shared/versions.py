"""Installed package versions, read from their metadata (importing a package such as torch to ask would take
seconds); one home for the CLI's ``--version`` and the inference server's metadata."""
from __future__ import annotations

from importlib import metadata


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def trainyard_version() -> str:
    # A checkout that was never pip-installed has no metadata.
    return installed("trainyard") or "0+unknown"
