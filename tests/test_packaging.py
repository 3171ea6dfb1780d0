"""Packaging: installing the package keeps the user's torch build; the wheel carries configs and the console script."""
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

import dinov2

pytestmark = pytest.mark.slow


def _project_copy(tmp_path):
    """The files a build reads, copied so that build artefacts never land in the checkout."""
    dst = tmp_path / "src"
    shutil.copytree(ROOT / "dinov2", dst / "dinov2", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, dst / name)
    return dst


def _pip(*args: str, cwd) -> subprocess.CompletedProcess:
    # Build with the interpreter's setuptools when it is recent enough, so that the test needs no download.
    isolation = []
    if importlib.util.find_spec("setuptools") is not None:
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 77:
            isolation = ["--no-build-isolation"]
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args, *isolation]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _dry_run(target: str, tmp_path):
    """Names that `pip install <target>` would install into this interpreter (which already has torch and
    torchvision), and the package's declared requirements."""
    report = tmp_path / "report.json"
    _pip("install", "--dry-run", "--quiet", "--report", str(report), target, cwd=_project_copy(tmp_path))
    data = json.loads(report.read_text())
    installs = {item["metadata"]["name"].lower(): item for item in data["install"]}
    requires = installs["panopticon"]["metadata"].get("requires_dist", [])
    return set(installs), requires


@pytest.mark.parametrize("target", [".", ".[train]"])
def test_install_keeps_the_users_torch(target, tmp_path):
    import torch
    import torchvision

    assert torch.__version__ and torchvision.__version__  # the precondition: both are installed here
    names, requires = _dry_run(target, tmp_path)
    assert "panopticon" in names
    assert not names & {"torch", "torchvision"}, f"pip install {target} would replace torch: {sorted(names)}"
    # core: torch without torchvision; all torch/torchvision requirements are lower bounds only
    core = [r for r in requires if "extra ==" not in r]
    assert any(re.match(r"torch\s*>=", r) for r in core) and not any(r.startswith("torchvision") for r in core)
    for r in requires:
        if re.match(r"torch(vision)?\b", r):
            assert re.match(r"torch(vision)?\s*>=\s*[\d.]+\s*(;|$)", r), f"not a lower bound: {r}"
    data_extra = [r for r in requires if 'extra == "data"' in r]
    assert any(r.startswith("torchvision>=") for r in data_extra)


def test_wheel_has_configs_version_and_console_script(tmp_path):
    proc = _pip("wheel", "--no-deps", "--quiet", "-w", str(tmp_path), ".", cwd=_project_copy(tmp_path))
    assert "would be ignored" not in proc.stderr, proc.stderr
    wheel = next(tmp_path.glob("panopticon-*.whl"))
    assert wheel.name.startswith(f"panopticon-{dinov2.__version__}-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    repo_yamls = {p.relative_to(ROOT).as_posix() for p in (ROOT / "dinov2" / "configs").rglob("*.yaml")}
    assert len(repo_yamls) > 50 and repo_yamls <= names, sorted(repo_yamls - names)[:5]
    assert "dinov2/models/panopticon.py" in names and "dinov2/run/cli.py" in names
    assert re.search(r"^panopticon\s*=\s*dinov2\.run\.cli:main$", entry_points, re.M), entry_points
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_version_declared_once():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text
    assert re.findall(r"^version\s*=.*$", text, re.M) == ['version = { attr = "dinov2.__version__" }']
    assert re.fullmatch(r"\d+\.\d+\.\d+", dinov2.__version__)
    assert not (ROOT / "setup.py").exists()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{dinov2.__version__}]" in changelog
    citation = (ROOT / "CITATION.cff").read_text()
    assert "cff-version:" in citation and "2503.10845" in citation
