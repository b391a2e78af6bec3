"""Stores that misbehave on purpose, for the tests of what a full disk must not break."""
from __future__ import annotations

import errno

from shared.storage import LocalStore


class FullDisk(LocalStore):
    """A local store that runs out of space after ``budget`` bytes: writes then fail with ENOSPC."""

    def __init__(self, root, budget):
        super().__init__(root)
        self.budget = budget

    def _write_bytes(self, key, data):
        if len(data) > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        super()._write_bytes(key, data)
