"""The README's API tour is run as written, so it cannot drift from the API."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs():
    if not README.exists():
        pytest.skip("README.md is not next to the tests")
    tour = re.search(r"## API tour\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert tour is not None, "README.md has no API tour code block"
    namespace = {}
    exec(compile(tour.group(1), str(README), "exec"), namespace)
    assert namespace["y"].shape == namespace["x"].shape
    assert namespace["mask"].dtype.name == "uint8"
