"""Instructions as conditions are keyed: one canonical spelling per instruction."""

from __future__ import annotations


def normalize_instruction(instruction: str | None) -> str:
    """Canonical form of an instruction: trimmed, single-spaced, lower case ('' = unconditional)."""
    return " ".join((instruction or "").split()).lower()
