"""Handles (`umbral_name`): accepted in any letter case, stored and compared lower-cased."""

from __future__ import annotations

import re

from umbra_grpc.domain.errors import InvalidHandle

_HANDLE = re.compile(r"[a-z0-9_.\-]{3,50}", re.ASCII)


def normalize_handle(raw: str) -> str:
    """The canonical handle, or `InvalidHandle` when it is not 3-50 of a-z 0-9 _ . -."""
    handle = raw.lower()
    if not _HANDLE.fullmatch(handle):
        raise InvalidHandle
    return handle
