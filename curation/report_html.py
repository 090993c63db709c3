"""report.html: the report's sections as one self-contained page (CSS inline, plots as data URIs).

Why self-contained: the file is mailed, attached to a ticket, opened from a CI artifact; it
must show everything without the PNGs beside it and without a network. No JavaScript: the
page is a document (collapsible example pairs use <details>). Every text goes through
``html.escape``; inline markdown (bold, code) through markdown-it with raw HTML off, so a
pair's text can never inject markup.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from curation.report_doc import (
    Block,
    Code,
    Examples,
    Image,
    Markdown,
    Paragraph,
    Report,
    Section,
    Table,
    cell_text,
)

_md = MarkdownIt("commonmark", {"html": False}).enable("table")
_IMG_SRC = re.compile(r'<img src="([A-Za-z0-9_.-]+\.png)"')

CSS = """
:root { --ink: #1d2733; --muted: #5c6b7a; --line: #d9e0e6; --kept: #2a9d8f; --drop: #e76f51; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); margin: 0;
       background: #fff; }
header { background: var(--bg); border-bottom: 1px solid var(--line); padding: 1.5rem 2rem 1rem; }
header h1 { margin: 0 0 .4rem; font-size: 1.6rem; }
nav a { margin-right: 1rem; color: var(--kept); text-decoration: none; font-size: .9rem; }
main { padding: 0 2rem 3rem; max-width: 1280px; }
section { margin-top: 2rem; }
h2 { border-bottom: 2px solid var(--line); padding-bottom: .2rem; font-size: 1.25rem; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid var(--line); padding: .25rem .6rem; text-align: left; vertical-align: top;
         overflow-wrap: anywhere; }
th { background: var(--bg); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { background: var(--bg); padding: 0 .25rem; border-radius: 3px; font-size: .88em; }
pre { background: var(--bg); border: 1px solid var(--line); padding: .75rem; overflow-x: auto;
      white-space: pre-wrap; overflow-wrap: anywhere; }
figure { margin: 1rem 0 1.5rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .85rem; }
details { border: 1px solid var(--line); border-radius: 6px; margin: .6rem 0; padding: .4rem .8rem; }
summary { cursor: pointer; font-weight: 600; }
.pair { border-top: 1px dashed var(--line); padding: .6rem 0; }
.why { color: var(--muted); font-size: .88rem; margin: .2rem 0 .4rem; }
.texts { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: .6rem; }
.texts div { background: var(--bg); border-radius: 4px; padding: .4rem .6rem; white-space: pre-wrap;
             overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: .82rem; }
.texts b { display: block; font-family: system-ui, sans-serif; font-size: .75rem; color: var(--muted); }
.texts .chosen { border-left: 3px solid var(--kept); }
.texts .rejected { border-left: 3px solid var(--drop); }
@media (max-width: 800px) { .texts { grid-template-columns: 1fr; } main, header { padding: 1rem; } }
"""


def _inline(text: str) -> str:
    """Inline markdown (bold, code) to HTML; raw HTML in the text is escaped, never rendered."""
    return _md.renderInline(text)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _table(block: Table) -> str:
    numeric = block.numeric or [bool(block.rows) and all(_is_number(r[i]) or r[i] is None for r in block.rows)
                                and any(_is_number(r[i]) for r in block.rows) for i in range(len(block.headers))]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{html.escape(cell_text(v))}</td>' if numeric[i]
                                    else f"<td>{_inline(cell_text(v))}</td>" for i, v in enumerate(row)) + "</tr>"
                   for row in block.rows)
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _image(block: Image, folder: Path) -> str:
    from curation.report import data_uri

    path = folder / block.file
    if not path.is_file():
        return f"<p><em>{html.escape(block.alt)}: {html.escape(block.file)} was not written</em></p>"
    caption = f"<figcaption>{_inline(block.caption)}</figcaption>" if block.caption else ""
    return f'<figure><img src="{data_uri(path)}" alt="{html.escape(block.alt)}">{caption}</figure>'


def _examples(block: Examples) -> str:
    pairs = []
    for ex in block.pairs:
        numbers = [f"margin {ex.margin:.4g}" if ex.margin is not None else "",
                   f"beta weight {ex.weight:.3g}" if ex.weight is not None else ""]
        facts = "; ".join(n for n in numbers if n)
        texts = "".join(f'<div class="{side}"><b>{side}</b>{html.escape(text)}</div>'
                        for side, text in (("prompt", ex.prompt), ("chosen", ex.chosen), ("rejected", ex.rejected)))
        pairs.append(f'<div class="pair"><code>{html.escape(ex.pair_id[:16])}</code> {html.escape(facts)}'
                     f'<p class="why">why: {html.escape(ex.why)}</p><div class="texts">{texts}</div></div>')
    summary = f"{html.escape(block.reason)}: {block.total} pair(s), {len(block.pairs)} shown"
    return f"<details open><summary>{summary}</summary>{''.join(pairs)}</details>"


def _markdown(block: Markdown, folder: Path) -> str:
    """Raw markdown lines; their local images become data URIs too."""
    from curation.report import data_uri

    rendered = _md.render("\n".join(block.lines))

    def inline(match: re.Match[str]) -> str:
        path = folder / match.group(1)
        return f'<img src="{data_uri(path)}"' if path.is_file() else match.group(0)

    return _IMG_SRC.sub(inline, rendered).replace("<table>", '<div class="table-wrap"><table>').replace(
        "</table>", "</table></div>")


def _block(block: Block, folder: Path) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Image):
        return _image(block, folder)
    if isinstance(block, Code):
        return f'<pre><code class="language-{html.escape(block.language)}">{html.escape(block.text)}</code></pre>'
    if isinstance(block, Examples):
        return _examples(block)
    if isinstance(block, Markdown):
        return _markdown(block, folder)
    raise TypeError(f"unknown report block {type(block).__name__}")


def _section(section: Section, folder: Path) -> str:
    body = "\n".join(_block(b, folder) for b in section.blocks)
    return f'<section id="{html.escape(section.key)}"><h2>{html.escape(section.title)}</h2>\n{body}\n</section>'


def render_html(report: Report, folder: Path) -> str:
    """The whole page; ``folder`` holds the PNGs the image blocks name (they are embedded)."""
    nav = "".join(f'<a href="#{html.escape(s.key)}">{html.escape(s.title)}</a>' for s in report.sections)
    sections = "\n".join(_section(s, Path(folder)) for s in report.sections)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(report.title)}</title><style>{CSS}</style></head>\n<body>"
            f"<header><h1>{html.escape(report.title)}</h1><p>{_inline(report.lead)}</p><nav>{nav}</nav></header>\n"
            f"<main>\n{sections}\n</main></body></html>\n")
