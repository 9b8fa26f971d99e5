"""The failure museum: every way a shared state.db has failed in public, reproduced with
real processes and real files, and survived. One file per exhibit (numbered as in
issue #4); every test here carries the ``museum`` marker, so the whole museum runs with::

    pytest -m museum -n auto

Each exhibit records its figures (kills, writes lost, longest wait, WAL peak ...) with the
``exhibit`` fixture; the run ends with a table of them (printed by ``tests/conftest.py``,
which is the one conftest the xdist controller loads). Figures are reported, never
asserted as timings: the machine is shared and noisy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Hooks are global: mark only the items collected from this directory.
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.museum)
