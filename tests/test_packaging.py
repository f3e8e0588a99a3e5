"""`.ci/floors.txt`, the constraints of a run at the lowest dependency versions, pins what `pyproject.toml` allows."""

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers.jobs import REPO


def test_ci_floors_pin_the_lowest_versions_pyproject_allows():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"]["dev"]]
    floors = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            (specifier,) = pin.specifier
            assert specifier.operator == "==", line
            floors[pin.name] = Version(specifier.version)

    assert sorted(floors) == sorted(requirement.name for requirement in requirements)
    for requirement in requirements:
        lowest = next(Version(s.version) for s in requirement.specifier if s.operator == ">=")
        pinned = floors[requirement.name]
        assert pinned in requirement.specifier, f"{requirement.name} {pinned} is outside {requirement.specifier}"
        assert pinned.release[: len(lowest.release)] == lowest.release, f"{requirement.name} {pinned} is not {lowest}"
