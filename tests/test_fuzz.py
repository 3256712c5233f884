"""Fuzzing the delta artifact (benchmarks/fuzz_artifact.py) with fixed seeds: 1,200 mutations of a
saved artifact (bit flips and byte changes in tensor data and the safetensors header, truncations,
appended bytes, structured header edits, JSON byte changes and edits of every field), each loaded
onto a copy of the base. No load may silently give other tensors, raise anything but the
documented errors, fail only at the first forward, or fail after modifying the base.

A second run with verify="none" (content digests skipped, explicitly) checks the defensive reading
on its own: silent differences are then expected, anything else is not. The longer run and the
published counts: docs/integrity.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz_artifact  # noqa: E402


def _report(result) -> str:
    return fuzz_artifact.table(result) + f"\n{result['error_types']}\n{result['examples']}"


def test_fuzz_full_verification(tmp_path):
    result = fuzz_artifact.run(seeds=(0, 1), count=600, workdir=tmp_path)
    counts = result["counts"]
    assert result["total"] == 1200
    assert counts["silent_different"] == 0, _report(result)
    assert counts["other_error"] == 0, _report(result)
    assert counts["forward_error"] == 0, _report(result)
    assert result["base_modified"] == 0, _report(result)
    # every kind of mutation ran, and both harmless (reformatted JSON) and harmful ones were seen
    assert set(result["by_kind"]) == set(fuzz_artifact.KINDS)
    assert counts["identical"] > 0 and counts["clear_error"] > 1000


def test_fuzz_structure_checks_without_digests(tmp_path):
    result = fuzz_artifact.run(seeds=(2,), count=300, workdir=tmp_path, verify="none")
    counts = result["counts"]
    assert counts["other_error"] == 0, _report(result)
    assert counts["forward_error"] == 0, _report(result)
    assert result["base_modified"] == 0, _report(result)
    assert counts["clear_error"] > 0
