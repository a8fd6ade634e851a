"""Every test belongs to exactly one tier (unit, integration, e2e), so `-m unit` etc. select all
of them: a test module without its tier's ``pytestmark`` fails the collection, naming itself."""

from __future__ import annotations

import pytest

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = sorted({f"{item.nodeid.split('::')[0]}: tiers {[t for t in TIERS if item.get_closest_marker(t)]}"
                    for item in items if sum(1 for t in TIERS if item.get_closest_marker(t)) != 1})
    if wrong:
        raise pytest.UsageError("every test needs exactly one tier marker (pytestmark = pytest.mark.unit, "
                                "integration or e2e):\n  " + "\n  ".join(wrong))
