"""The curation report as data: sections of blocks, drawn by two renderers (markdown here, HTML in
curation/report_html.py).

Why: the report grows (new plots, new checks); a section written once as blocks appears in
report.md, report.html and the Prefect artifact alike, and neither renderer knows any section.
A block is a paragraph, a table, an image (a file beside the report), a code listing, example
pairs, or raw markdown lines (for sections written as markdown; the HTML renderer converts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Paragraph:
    """One paragraph; inline markdown (**bold**, `code`) is allowed."""

    text: str


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    numeric: Sequence[bool] | None = None  # right-aligned columns; default: guessed from the values


@dataclass(frozen=True)
class Image:
    """A PNG beside the report (a bare file name): linked by report.md, embedded by report.html."""

    file: str
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class Code:
    text: str
    language: str = "sql"


@dataclass(frozen=True)
class Example:
    """One pair shown in full: why it was dropped (or kept), with its margin."""

    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    margin: float | None
    why: str
    weight: float | None = None


@dataclass(frozen=True)
class Examples:
    """A few pairs of one decision reason."""

    reason: str
    total: int
    pairs: Sequence[Example]


@dataclass(frozen=True)
class Markdown:
    """Raw markdown lines (a section written before the blocks existed keeps working in both renderers)."""

    lines: Sequence[str]


Block = Paragraph | Table | Image | Code | Examples | Markdown


@dataclass
class Section:
    """A titled part of the report; ``key`` is its anchor in the HTML."""

    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    title: str
    lead: str  # the one-paragraph summary under the title (inline markdown)
    sections: list[Section]


def markdown_section(key: str, lines: Sequence[str]) -> Section:
    """A section written as markdown lines that start with its own ``## Title`` heading.

    How a section written for the old single-markdown report joins ``SECTIONS`` unchanged:
    ``lambda run_id, data: markdown_section("dups", _screen_markdown(data))``.
    """
    lines = list(lines)
    if not lines or not lines[0].startswith("## "):
        raise ValueError(f"section {key!r}: markdown lines must start with a '## Title' heading")
    body = lines[1:]
    while body and not body[0].strip():
        body = body[1:]
    return Section(key, lines[0][3:].strip(), [Markdown(body)])


# -- markdown ---------------------------------------------------------------------------------------


def cell_text(value: Any) -> str:
    """How a table cell reads: floats to 4 significant digits, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return cell_text(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    """A text whole, on one markdown line: newlines shown as ⏎."""
    return text.replace("\r\n", "\n").replace("\n", " ⏎ ")


def _markdown_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        return [block.text, ""]
    if isinstance(block, Table):
        return [markdown_table(block.headers, block.rows), ""]
    if isinstance(block, Image):
        return [f"![{block.alt}]({block.file})", *([f"*{block.caption}*"] if block.caption else []), ""]
    if isinstance(block, Code):
        return [f"```{block.language}", block.text, "```", ""]
    if isinstance(block, Examples):
        out = [f"**{block.reason}** ({block.total} pairs; {len(block.pairs)} shown):", ""]
        for ex in block.pairs:
            margin = "" if ex.margin is None else f"margin {ex.margin:.4g}; "
            out += [f"- `{ex.pair_id[:12]}` {margin}why: {ex.why}",
                    f"  - prompt: {_one_line(ex.prompt)}", f"  - chosen: {_one_line(ex.chosen)}",
                    f"  - rejected: {_one_line(ex.rejected)}"]
        return [*out, ""]
    if isinstance(block, Markdown):
        return list(block.lines)
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_markdown(report: Report) -> str:
    """report.md: the title, the lead paragraph, then each section under a level-2 heading."""
    out = [f"# {report.title}", "", report.lead, ""]
    for section in report.sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            out += _markdown_block(block)
    return "\n".join(out)
