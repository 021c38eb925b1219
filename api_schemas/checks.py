"""Checks every kind of job applies to its fields: a number within its range, a text that shows something."""

from __future__ import annotations

import math
import unicodedata

from api_schemas.errors import ErrorCode, InvalidInput


def check_range(name: str, value: float, low: float, high: float) -> None:
    """Raise `InvalidInput` (code `invalid_<name>`) unless `low <= value <= high` and `value` is finite."""
    if not math.isfinite(value):
        # NaN passes no comparison and neither is JSON: name it, and report it as text.
        raise InvalidInput(
            f"{name} must be a finite number between {low} and {high}; got {value}.",
            code=ErrorCode(f"invalid_{name}"),
            details={"field": name, "value": str(value), "min": low, "max": high},
        )
    if not low <= value <= high:
        raise InvalidInput(
            f"{name} must be between {low} and {high}; got {value}.",
            code=ErrorCode(f"invalid_{name}"),
            details={"field": name, "value": value, "min": low, "max": high},
        )


#: Letters that render as blank space (Hangul fillers, the blank Braille pattern).
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def visible(text: str) -> bool:
    """Whether `text` shows anything: not only spaces, format characters (zero-width space, joiners,
    BOM, bidi marks) or blank letters."""
    return any(
        not ch.isspace() and unicodedata.category(ch) != "Cf" and ch not in _BLANK_LETTERS for ch in text
    )


def check_instruction(instruction: str, max_chars: int, empty_message: str) -> str:
    """`instruction` stripped, refused when it shows nothing (`empty_message`) or is over `max_chars`."""
    instruction = instruction.strip()
    if not visible(instruction):
        raise InvalidInput(empty_message, code=ErrorCode.EMPTY_INSTRUCTION)
    if len(instruction) > max_chars:
        raise InvalidInput(
            f"The instruction has {len(instruction)} characters; the limit is {max_chars}.",
            code=ErrorCode.INSTRUCTION_TOO_LONG,
            details={"length": len(instruction), "max": max_chars},
        )
    return instruction
