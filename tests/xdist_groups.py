"""A pytest plugin (loaded by conftest): under pytest-xdist (`make test`: two workers, --dist loadgroup) every test
of the shared dev server runs on one worker, so the session starts one server and runs one retrain_job, as in a
single process. Marked as each item is collected, before any collection_modifyitems (xdist reads the group in its
own)."""

from __future__ import annotations

import pytest

SERVER_GROUP = "dagster_server"


def pytest_itemcollected(item: pytest.Item) -> None:
    if "dagster_server" in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.xdist_group(SERVER_GROUP))
