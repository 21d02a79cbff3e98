"""Errors of the service process itself (not of one call), and the clipping of caller-supplied text."""

from __future__ import annotations

# Caller-supplied values (request ids, shapes, decoder errors) go into status messages and logs clipped
# to this many characters: a 1 MB request id must not come back as a 1 MB status message or log line.
CLIP_CHARS = 200


class ServiceError(Exception):
    """The service cannot start (bad artifact, address in use, unsafe exposure, ...)."""


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"
