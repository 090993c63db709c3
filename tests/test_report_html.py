"""report.html: self-contained, drawn from the same sections as report.md, and checked in a real
headless chromium (no console errors, every image decoded, a screenshot kept with the test output)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from curation.report import SECTIONS, _table, html_path, report_data, report_document
from curation.report_doc import (
    Example,
    Examples,
    Image,
    Markdown,
    Paragraph,
    Report,
    Section,
    Table,
    markdown_section,
    render_markdown,
)
from curation.report_html import render_html
from curation.store import Catalog
from tests.browser import browser, image_widths, keep_screenshot, new_page
from tests.synthetic_run import curated_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, str, Path]:
    catalog, run_id, result = curated_run(tmp_path_factory.mktemp("report-html"))
    return catalog, run_id, html_path(result.report_path)


def test_report_html_in_a_real_browser(run, tmp_path: Path) -> None:
    catalog, run_id, page_path = run
    with browser() as instance:
        page, log = new_page(instance, 1280, 1400)  # the screenshot: summary, counts and the margin plot
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        images = image_widths(page)
        headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
        reasons = page.eval_on_selector_all("#examples summary", "els => els.map(e => e.textContent)")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot))
        keep_screenshot(shot, "report.png")
        # narrow screens: nothing overflows the page sideways except inside the scrollable table wrappers
        page.set_viewport_size({"width": 420, "height": 900})
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert log.errors == []
    # margin, edit distance, length gap, token lengths, training curves
    assert len(images) == 5 and all(i["complete"] and i["width"] > 0 for i in images), images
    assert headings == ["Decisions by reason and stage", "Plots", "Filters", "What was dropped, and where",
                        "Near-duplicates and contamination", "Lengths", "Stages", "Objective advice",
                        "Training", "Evaluation", "Dropped pairs, by reason", "Ask the catalog"]
    dropped = catalog.query("SELECT reason, count(*) AS n FROM decisions WHERE run_id = ? AND NOT kept "
                            "AND reason != 'heldout' GROUP BY 1", [run_id])
    assert sorted(r.split(":")[0] for r in reasons) == sorted(dropped["reason"].to_list())
    assert shot.stat().st_size > 10_000 and overflow <= 0


def test_report_html_is_self_contained(run) -> None:
    text = run[2].read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources), sources
    assert "<script" not in text and "http://" not in text and "https://" not in text


def test_every_section_is_in_both_renderers(run) -> None:
    catalog, run_id, page_path = run
    markdown = page_path.with_suffix(".md").read_text()
    html = page_path.read_text()
    document = report_document(run_id, report_data(catalog, run_id))
    for section in document.sections:
        assert f"## {section.title}\n" in markdown and f"<h2>{section.title}</h2>" in html, section.title
    assert "| policy | gold_reward | 0.94 | 0.92 |" in markdown  # evaluation with its reference
    assert "why: margin" in markdown and "![training curves](training.png)" in markdown


def test_a_new_section_appears_in_markdown_and_html(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What another engineer's section needs: one function in SECTIONS (blocks, or markdown lines)."""
    catalog, run_id, page_path = run
    (tmp_path / "extra.png").write_bytes((page_path.parent / "margin.png").read_bytes())

    def extra(run_id: str, data: dict) -> Section:
        return Section("extra", "Token lengths", [
            Paragraph("over **max_length**: 3"), Table(["pairs", "share"], [[3, "1.0%"]]),
            Markdown(["| a | b |", "|---|---|", "| 1 | 2 |", "", "![extra plot](extra.png)", ""])])

    def written_as_markdown(run_id: str, data: dict) -> Section:  # a section of the old single-markdown report
        return markdown_section("dups", ["## Duplicates, old style", "", "**2 clusters**", "", _table(["size"], [[2]]), ""])

    monkeypatch.setattr("curation.report.SECTIONS", [*SECTIONS, extra, written_as_markdown])
    document = report_document(run_id, report_data(catalog, run_id))
    markdown, html = render_markdown(document), render_html(document, tmp_path)
    assert "## Token lengths" in markdown and "over **max_length**: 3" in markdown and "![extra plot](extra.png)" in markdown
    assert "<h2>Token lengths</h2>" in html and "<strong>max_length</strong>" in html
    assert '<img src="data:image/png;base64,' in html.split("Token lengths")[-1]  # the markdown image, embedded
    assert "## Duplicates, old style\n\n**2 clusters**" in markdown and markdown.count("## Duplicates, old style") == 1
    assert '<section id="dups"><h2>Duplicates, old style</h2>' in html and "<strong>2 clusters</strong>" in html


def test_pair_texts_cannot_inject_markup(tmp_path: Path) -> None:
    evil = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    report = Report("r", f"lead {evil}", [Section("s", evil, [
        Paragraph(evil), Table(["h"], [[evil]]), Image("missing.png", evil),
        Examples("beta_outlier_low", 1, [Example("abc", evil, evil, evil, -1.0, evil, 0.01)])])])
    html = render_html(report, tmp_path)
    assert "<script" not in html and "<img src=x" not in html and "&lt;script&gt;" in html
