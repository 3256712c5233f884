"""Installability: library dependencies are ranges whose lower bounds are the set CI tests.

pyproject.toml states ranges (so the package installs next to a newer transformers, vLLM or SGLang);
constraints.txt pins the exact tested set and scripts/setup.sh installs with it (torch first, pinned,
so an unpinned torch never pulls a CUDA build). Checked here: no exact pin in the library's
dependencies; every constraint satisfies every requirement naming its package (extras included);
each library dependency's lower bound is the pinned version; upper bounds only where we rely on
internals (torchao, transformers); the extras the issue asks for exist; setup.sh uses the file;
the running environment satisfies the ranges.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, Version]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[_norm(name)] = Version(version)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: bool = True) -> list[tuple[str, Requirement]]:
    p = project()
    out = [("dependencies", Requirement(r)) for r in p["dependencies"]]
    if extras:
        out += [(f"extra {e}", Requirement(r)) for e, reqs in p["optional-dependencies"].items() for r in reqs]
    return out


# The stack whose behaviour we depend on: its lower bound is exactly the tested version. The small
# utilities (tqdm, numpy via torch's .numpy(), click) keep older lower bounds: their APIs we use are
# stable, and a numpy >= 2.4 floor would clash with engines that pin an older numpy.
CORE = {"torch", "torchao", "transformers", "safetensors", "huggingface-hub"}


def test_library_dependencies_are_ranges_with_the_tested_lower_bound():
    pinned = pins()
    names = set()
    for _, req in requirements(extras=False):
        specs = list(req.specifier)
        assert specs and not any(s.operator in ("==", "===", "~=") for s in specs), f"{req} is not a range"
        lower = [Version(s.version) for s in specs if s.operator == ">="]
        assert lower, f"{req} has no lower bound"
        name = _norm(req.name)
        names.add(name)
        assert name in pinned, f"{req.name} is not pinned in constraints.txt"
        if name in CORE:
            assert lower[0] == pinned[name], f"{req}: lower bound {lower[0]} is not the tested {pinned[name]}"
        else:
            assert lower[0] <= pinned[name]
    assert CORE <= names
    upper = {req.name for _, req in requirements(extras=False) if any(s.operator in ("<", "<=") for s in req.specifier)}
    assert upper == {"torchao", "transformers"}  # what we rely on the internals of (see the pyproject comment)


def test_every_pin_satisfies_every_range():
    pinned = pins()
    for where, req in requirements():
        name = _norm(req.name)
        if name in pinned:
            assert req.specifier.contains(pinned[name], prereleases=True), f"{where}: {req} excludes the tested {pinned[name]}"


def test_extras():
    extras = project()["optional-dependencies"]
    assert {"vllm", "optimum", "eval", "peft", "dev"} <= set(extras)
    dev = {_norm(Requirement(r).name) for r in extras["dev"]}
    assert {"peft", "pytest", "optimum", "lm-eval", "triton"} <= dev


def test_setup_installs_torch_first_with_the_constraints():
    script = (REPO / "scripts" / "setup.sh").read_text()
    lines = [line.strip() for line in script.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert len(lines) == 2 and all("-c constraints.txt" in line for line in lines), lines
    assert "torch==" in lines[0] and '-e ".[dev]"' in lines[1]
    assert Version("2.13") <= pins()["torch"] and "cpu" in (REPO / "constraints.txt").read_text().lower()


def test_this_environment_satisfies_the_ranges():
    for _, req in requirements(extras=False):
        installed = Version(metadata.version(req.name))
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is outside {req}"
