"""Table printing shared by the benches (``python bench/<name>.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations


def print_plain(header: list[str], rows: list[list[str]]) -> None:
    """Print a fixed-width text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def print_markdown(header: list[str], rows: list[list[str]]) -> None:
    """Print a Markdown table."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
