"""The README documents every setting and starts with the two commands."""

from __future__ import annotations

import re
from pathlib import Path

from api_schemas.jobs import JobLimits
from app.settings import GatewaySettings
from models.settings import EngineSettings
from workers.config import WorkerSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_settings_table():
    names = {
        f"DREAMOMNI2_{name.upper()}"
        for cls in (JobLimits, WorkerSettings, GatewaySettings, EngineSettings)
        for name in cls.model_fields
        if name != "limits"
    }
    missing = sorted(name for name in names if f"`{name}`" not in README)
    assert not missing, f"settings missing from README.md: {missing}"


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```sh\n(.*?)```", README, re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_the_error_table_is_the_catalogue():
    from api_schemas.errors import error_table

    assert error_table() in README
