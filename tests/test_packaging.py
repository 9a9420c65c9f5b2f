"""The project installs as one package with its data, and pins agree everywhere."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile

from tests.conftest import REPO_ROOT


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(requirement_lines, name: str) -> str | None:
    """The exact version ``name`` is pinned to (PEP 503 name comparison), or None."""
    for line in requirement_lines:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)", line.strip())
        if match and normalise(match.group(1)) == normalise(name):
            return match.group(3)
    return None


def test_ray_is_pinned_to_one_exact_version_everywhere():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    in_pyproject = pinned(project["dependencies"], "ray")
    in_constraints = pinned((REPO_ROOT / "constraints.txt").read_text().splitlines(), "ray")
    assert in_pyproject and in_pyproject == in_constraints
    import ray

    assert ray.__version__ == in_pyproject


def test_every_runtime_dependency_is_pinned_in_constraints():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    constraints = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        name = re.match(r"^[A-Za-z0-9_.-]+", requirement).group(0)
        assert pinned(constraints, name), f"{name} is not pinned"


def test_wheel_ships_the_contracts_and_data_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO_ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("rolo_batch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for table in ("features", "tracks", "scores"):
        assert f"rolo_batch/schemas/{table}.json" in names
    assert "rolo_batch/datasets/otb_ranges.csv" in names
    assert "rolo_batch/data/otb30.csv" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rolo-batch = rolo_batch.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_readme_quick_start_is_the_two_make_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in quick_start.splitlines() if line.startswith("    ")]
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
