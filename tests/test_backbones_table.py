"""The README's supported-backbones table is generated from the test matrix and kept up to date."""

from __future__ import annotations

from benchmarks import backbones_table
from tests.conftest import BACKBONES


def test_table_has_a_row_per_tested_architecture_and_is_current():
    rows = backbones_table.build_rows()
    assert len(rows) == len(BACKBONES)
    assert [row["projection used"] for row in rows] == [backbone.projection for backbone in BACKBONES.values()]
    assert sum(row["tested on real weights"].startswith("✓") for row in rows) == 3
    table = backbones_table.to_markdown(rows)
    assert "| ASTModel | audio | 2d | 2D 12x101 (+2 special) |" in table
    assert backbones_table.RESULTS_PATH.read_text(encoding="utf-8") == table, (
        "benchmarks/results/backbones.md is stale: run `python -m benchmarks.backbones_table`"
    )
    readme = backbones_table.README_PATH.read_text(encoding="utf-8")
    assert backbones_table.with_table(readme, table) == readme, "README's table is stale: run the same command"
