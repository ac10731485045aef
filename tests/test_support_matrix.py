"""docs/support-matrix.md is generated from the registry and cannot drift from it."""

from __future__ import annotations

from pathlib import Path

from seahal import hal
from seahal.cli import main as cli
from seahal.hal.info import support_matrix_markdown

MATRIX = Path(__file__).resolve().parents[1] / "docs" / "support-matrix.md"
REGENERATE = "seahal support-matrix --write docs/support-matrix.md"


def test_docs_match_the_registry():
    assert MATRIX.read_text() == support_matrix_markdown(), f"docs/support-matrix.md is stale: run `{REGENERATE}`"


def test_matrix_has_a_row_per_op_and_a_column_per_backend():
    lines = support_matrix_markdown().splitlines()
    header = next(line for line in lines if line.startswith("| op |"))
    assert header.strip("| ").split(" | ")[1:] == sorted(hal.backends())
    rows = [line.split(" | ")[0].removeprefix("| ") for line in lines[lines.index(header) + 2 :]]
    assert rows == list(hal.specs())


def test_a_new_kernel_changes_the_matrix_and_check_catches_it(isolated_registry, tmp_path, capsys):
    stale = tmp_path / "support-matrix.md"
    assert cli(["support-matrix", "--write", str(stale)]) == 0
    assert cli(["support-matrix", "--check", str(stale)]) == 0
    rope = "seahal.backends.cpu.reference.rope:rope"
    hal.register_kernel("rope", "cpu", "simd", rope, capabilities={"dtype": ("float32",)})
    cell = "reference (dtype: bfloat16, float32, float64) [portable]<br>simd (dtype: float32) |"
    assert cell in support_matrix_markdown()  # each kernel marked portable or not on its own
    assert cli(["support-matrix", "--check", str(stale)]) == 1
    assert f"is out of date: run `seahal support-matrix --write {stale}`" in capsys.readouterr().err
