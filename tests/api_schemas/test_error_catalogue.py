"""The error catalogue: every code the code can raise is in it, and none is made outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api_schemas.errors import ERROR_CODES, ErrorCode, InvalidInput, ServiceError

ROOT = Path(__file__).resolve().parents[2]


def test_every_code_is_catalogued_with_a_status_and_a_meaning():
    assert set(ERROR_CODES) == set(ErrorCode)
    for code, info in ERROR_CODES.items():
        assert 400 <= info.status < 600 and info.meaning, code


def test_a_code_outside_the_catalogue_is_a_bug_caught_where_it_is_made():
    with pytest.raises(ValueError):
        InvalidInput("x", code="no_such_code")  # type: ignore[arg-type]


def test_every_error_class_default_code_is_catalogued():
    classes = [ServiceError, *ServiceError.__subclasses__()]
    classes += [sub for cls in list(classes) for sub in cls.__subclasses__()]
    for cls in classes:
        assert cls.code in ERROR_CODES, cls


def test_no_code_is_spelled_as_a_bare_string():
    # Codes are `ErrorCode` members everywhere, so a typo is an AttributeError, not a new code.
    pattern = re.compile(r"""code\s*=\s*["'][a-z_]+["']|["']code["']\s*:\s*["'][a-z_]+["']""")
    offenders = []
    for package in ("app", "workers", "models", "api_schemas"):
        for path in (ROOT / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if pattern.search(line) and "json_schema_extra" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not [o for o in offenders if "api_schemas/api.py" not in o], offenders
