"""Markdown tables for the generated reports (report, bench README, model zoo)."""

from __future__ import annotations


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """A GitHub-flavoured markdown table, one string per line; '|' and newlines inside cells are
    escaped so columns stay aligned; columns whose index is in `right` are right-aligned."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells for {len(headers)} columns: {row}")
    rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(headers))) + "|"
    return [line(headers), rule, *(line(r) for r in rows)]
