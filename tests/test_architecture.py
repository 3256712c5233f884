"""The package's shape, checked: one pipeline direction, no reach into another module's private
names, evaluation out of the library's import graph, a cheap `import deltacome_ao` and `deltacome --help`.

The stage order (docs/architecture.md): a module may import modules of its own stage or earlier
ones, never a later one — module-level and function-level (lazy) imports alike.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "deltacome_ao"

# Stages, earliest first. A module's stage is its first path component under deltacome_ao/.
STAGES = [
    ["version"],
    ["decompose"],
    ["allocate"],
    ["quantize", "gptq"],
    ["packing"],
    ["factors", "slicing"],
    ["ops"],
    ["delta_tensor"],
    ["methods"],
    ["kernels"],
    ["recipes", "checkpoint"],
    ["fingerprint", "format", "finetune_config"],
    ["calibrate", "self_calibration"],
    ["budget"],
    ["compress"],
    ["torchao_walk"],
    ["config"],
    ["hub", "restore"],
    ["artifact"],
    ["streaming", "hf"],
    ["lora"],
    ["tensor_parallel"],
    ["serving", "vllm_plugin"],
    ["evaluation"],
    ["cli"],
    ["optimum"],
    # 0.1 import paths kept for one release, and the package's lazy loader: above everything
    ["pairs", "compare", "evaluate", "harness", "mixed_precision_delta_tensor", "bitdelta_tensor", "__init__"],
]
STAGE = {name: i for i, names in enumerate(STAGES) for name in names}
EVALUATION_USERS = {"evaluation", "cli", "pairs", "compare", "evaluate", "harness"}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        parts = list(rel.with_suffix("").parts)
        yield path, parts


def _component(parts: list[str]) -> str:
    """The stage key of a module given its parts under deltacome_ao/ (deltacome_ao/__init__ is "__init__")."""
    return parts[0] if parts[0] != "__init__" or len(parts) > 1 else "__init__"


def _imports(path: Path, parts: list[str]):
    """(line, target parts under deltacome_ao/, imported names) of every import of the package."""
    tree = ast.parse(path.read_text())
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    if parts[-1] == "__init__":
        package = parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else list(package)
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "deltacome_ao":
                target = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            if not target:  # `from . import x`: the modules x themselves
                for n in names:
                    yield node.lineno, [n], []
            else:
                yield node.lineno, target, names
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "deltacome_ao":
                    yield node.lineno, a.name.split(".")[1:] or ["__init__"], []


def test_every_module_has_a_stage():
    missing = sorted({_component(p) for _, p in _modules()} - set(STAGE))
    assert not missing, f"add these modules to STAGES (and docs/architecture.md): {missing}"


def test_imports_never_go_to_a_later_stage():
    upward = []
    for path, parts in _modules():
        here = _component(parts)
        for line, target, _ in _imports(path, parts):
            if not target:
                continue
            there = target[0]
            if there not in STAGE:
                target_file = PKG.joinpath(*target).with_suffix(".py")
                if not target_file.exists():
                    continue  # `from . import <attribute>` of a package __init__
            if there in STAGE and STAGE[there] > STAGE[here]:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {'.'.join(target)} "
                              f"(stage {there} comes after {here})")
    assert not upward, "\n".join(upward)


def _module_aliases(tree, path_parts) -> set[str]:
    """Names bound to package modules in a file: `import deltacome_ao.x as a`, `from . import x`,
    `from .pkg import module` (when `module` is a module file of the package)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "deltacome_ao":
                    aliases.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            absolute = node.level == 0 and (node.module or "").split(".")[0] == "deltacome_ao"
            if node.level or absolute:
                for a in node.names:
                    aliases.add(a.asname or a.name)  # names that are modules; other names are filtered below
    return aliases


def test_no_module_imports_another_modules_private_names():
    private = []
    for path, parts in _modules():
        for line, target, names in _imports(path, parts):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    private.append(f"{path.relative_to(REPO)}:{line} imports {'.'.join(target)}.{n}")
        tree = ast.parse(path.read_text())
        aliases = _module_aliases(tree, parts)
        for node in ast.walk(tree):  # `from . import artifact` ... `artifact._x`, `import deltacome_ao.x as a` ... `a._y`
            value = node.value if isinstance(node, ast.Attribute) else None
            while isinstance(value, ast.Attribute):
                value = value.value
            if (isinstance(node, ast.Attribute) and isinstance(value, ast.Name) and value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append(f"{path.relative_to(REPO)}:{node.lineno} uses {ast.unparse(node)}")
    assert not private, "\n".join(private)


def test_library_never_imports_evaluation_code():
    offenders = []
    for path, parts in _modules():
        if _component(parts) in EVALUATION_USERS:
            continue
        for line, target, _ in _imports(path, parts):
            if target and target[0] in ("evaluation", "pairs", "compare", "evaluate", "harness"):
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {'.'.join(target)}")
    assert not offenders, "\n".join(offenders)


def _python(code: str) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_is_cheap_and_loads_no_evaluation_code():
    out = _python(
        "import sys, json, deltacome_ao\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('deltacome_ao', 'torch', 'transformers'))))"
    )
    assert out == ["deltacome_ao", "deltacome_ao.version"]
    # the public names load the library, still without the evaluation zoo
    out = _python(
        "import sys, json\nfrom deltacome_ao import DeltaCoMeConfig, MultiDeltaModel, save_delta\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('deltacome_ao'))))"
    )
    assert "deltacome_ao.hf" in out and "deltacome_ao.serving" in out
    assert not [m for m in out if m.startswith(("deltacome_ao.evaluation", "deltacome_ao.pairs", "deltacome_ao.compare"))]


def test_cli_help_is_fast_and_imports_no_torch():
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    code = ("import sys, json\nfrom deltacome_ao.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'torchao'))))")
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    seconds = time.perf_counter() - start
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compress" in r.stdout and "inspect" in r.stdout
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    assert seconds < 3.0, seconds  # measured ~0.1 s here; importing torch alone takes ~1.5 s


@pytest.mark.parametrize("old, new", [
    ("deltacome_ao.pairs", "deltacome_ao.evaluation.pairs"),
    ("deltacome_ao.compare", "deltacome_ao.evaluation.compare"),
    ("deltacome_ao.evaluate", "deltacome_ao.evaluation.metrics"),
    ("deltacome_ao.harness", "deltacome_ao.evaluation.harness"),
])
def test_old_import_paths_still_work(old, new):
    import importlib

    assert importlib.import_module(old) is importlib.import_module(new)
