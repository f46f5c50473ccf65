"""The install a newcomer gets is the one the suite runs in: .ci/run runs README command 2 as
written, constraints.txt pins every dependency the project declares, and the packages in this
environment are the pinned versions (a stale constraints file fails here, not on a user's
machine). Nothing outside the repository is read."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _readme_command(n: int) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^# {n}\. .*\n(.+)$", text, re.M)
    assert m, f"README has no command {n}"
    return m.group(1).strip()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_norm(name)] = version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = _readme_command(2)
    assert "constraints.txt" in cmd and "venv" in cmd
    assert cmd in ci.splitlines(), ".ci/run must run README command 2 exactly as written"
    assert re.search(r"^rm -rf \.venv$", ci, re.M), ".ci/run must start from a new virtual env"


def test_constraints_pin_every_declared_dependency():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"] + meta["optional-dependencies"]["dev"]]
    pins = _pins()
    missing = [r.name for r in reqs if _norm(r.name) not in pins]
    assert not missing, f"constraints.txt lacks {missing}: run tools/renew_constraints.sh"
    outside = [f"{r.name}=={pins[_norm(r.name)]}" for r in reqs
               if not r.specifier.contains(pins[_norm(r.name)], prereleases=True)]
    assert not outside, f"pins outside pyproject's ranges: {outside}"


def test_this_environment_is_the_pinned_one():
    """Run by README command 2 (pip install -c constraints.txt): every pinned package that is
    installed has the pinned version (torch's local build label aside)."""
    pins, drift = _pins(), []
    for dist in metadata.distributions():
        pin = pins.get(_norm(dist.metadata["Name"]))
        if pin is not None and dist.version.split("+")[0] != pin.split("+")[0]:
            drift.append(f"{dist.metadata['Name']} {dist.version} (pinned {pin})")
    assert not drift, f"installed versions differ from constraints.txt: {drift}"
