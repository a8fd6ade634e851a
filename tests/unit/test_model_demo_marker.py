"""A demo model folder counts as built only with a marker of the current build format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.model import demo

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("marker, built", [
    (None, False),
    ("not json", False),
    ({"source": "x", "fingerprint": "y"}, False),  # an older, float32 build: rebuilt
    ({"format": demo.BUILD_FORMAT - 1}, False),
    ({"format": demo.BUILD_FORMAT, "source": "x"}, True),
])
def test_is_built_needs_the_current_format(tmp_path: Path, marker: object, built: bool) -> None:
    if marker is not None:
        text = marker if isinstance(marker, str) else json.dumps(marker)
        (tmp_path / "pdserve-demo.json").write_text(text)
    assert demo.is_built(tmp_path) is built
