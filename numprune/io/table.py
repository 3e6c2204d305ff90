"""Markdown tables: the one layout of every table of results numprune prints or saves."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table (header, ``---`` rule, one line a row), without a final newline.

    Cells are written with ``str``: each caller formats its numbers, since only it knows what a
    column holds (a percentage, a rate, a "median [min-max]" pair, "-" for a missing value).
    """
    return "\n".join([_line(header), "|" + "---|" * len(header), *map(_line, rows)])


def _line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"
