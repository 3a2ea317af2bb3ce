"""Error-message helpers shared by the servers (worker and coordinator)."""

from __future__ import annotations


def clip(text: str, limit: int = 80) -> str:
    """``repr`` of a client-supplied string for an error message, cut to ``limit`` characters: an error that
    echoed a huge field would exceed the caller's metadata limit and reach it as RESOURCE_EXHAUSTED instead of
    the real status."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
