"""System tools some tests need (chromium, promtool, faketime, a TLS-capable redis-server, ...).

On a bare machine (``pip install`` plus ``pytest``) a test whose tool is missing is skipped with
the reason. ``.ci/run`` installs every tool and sets ``STREAMBUS_REQUIRE_TOOLS=1``, which turns
each of those skips into a failure: CI always runs them.
"""

from __future__ import annotations

import os
import shutil
from typing import Final

import pytest

ENV_REQUIRE: Final = "STREAMBUS_REQUIRE_TOOLS"


def tools_required() -> bool:
    """True when a missing tool must fail the test instead of skipping it (CI)."""
    return os.environ.get(ENV_REQUIRE) == "1"


def missing(reason: str) -> None:
    """Skip (or, under ``STREAMBUS_REQUIRE_TOOLS=1``, fail) the running test for ``reason``."""
    if tools_required():
        pytest.fail(f"{reason} ({ENV_REQUIRE}=1: CI must run this test)", pytrace=False)
    pytest.skip(reason)


def need(tool: str, why: str = "") -> str:
    """The path of ``tool`` on PATH; skip or fail (see :func:`missing`) when it is absent."""
    found = shutil.which(tool)
    if found is None:
        missing(f"needs {tool!r} on PATH{': ' + why if why else ''}")
        raise AssertionError("unreachable")  # pragma: no cover - missing() never returns
    return found
