"""The paper's tables (reports/paper/*.csv) as Python rows.

The CSV files are the single source of the paper's numbers; ran-bench is used from a checkout
(installed with `pip install -e .`), so they are found relative to the package.
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

PAPER_DIR = Path(__file__).resolve().parent.parent / "reports" / "paper"


def _convert(value: str):
    if value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


@cache
def _load_text(name: str) -> tuple[dict, ...]:
    path = PAPER_DIR / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"paper table {path} not found; ran-bench reads the paper's numbers from its checkout's "
            "reports/paper/ (install with `pip install -e .` from a clone)"
        )
    with path.open(newline="") as f:
        return tuple(csv.DictReader(f))


@cache
def _load(name: str) -> tuple[dict, ...]:
    return tuple({k: _convert(v) for k, v in row.items()} for row in _load_text(name))


def load_table(name: str) -> list[dict]:
    """Rows of reports/paper/<name>.csv with numbers converted and empty cells as None."""
    return [dict(row) for row in _load(name)]


def load_table_text(name: str) -> list[dict]:
    """Rows of reports/paper/<name>.csv as the strings the paper prints ("20.50", not 20.5), in the
    order of `load_table(name)`: for display, where converting would drop the paper's digits."""
    return [dict(row) for row in _load_text(name)]


def table7_row(model: str) -> dict | None:
    """The Table 7 row reproduced by `model`, or None."""
    return next((r for r in _load("table7_imagenet") if r["model"] == model), None)


def released_definition(model: str) -> dict | None:
    """Parameters and multiply-adds counted from the authors' released definition of `model`."""
    return next((r for r in _load("released_definitions") if r["model"] == model), None)
