"""Headless chromium for the tests: Debian's /usr/bin/chromium driven by playwright (never a downloaded browser).

scripts/setup.sh --dev installs chromium with apt when it is missing; where it cannot be
installed the browser tests skip with the reason. Playwright starts every browser with a fresh
temporary profile (its own --user-data-dir) and these flags, which work on a container
without a GPU, a sandbox or a network.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
UPDATE_SCREENSHOTS_ENV = "WINNOW_UPDATE_SCREENSHOTS"  # set to 1: the tests also refresh docs/img/
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def chromium_path() -> str:
    """The system chromium, or a skip that says how to get it."""
    found = shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium")
    if not found:
        pytest.skip("chromium is not installed and could not be: scripts/setup.sh --dev runs "
                    "`apt-get install -y chromium` where apt is available")
    pytest.importorskip("playwright.sync_api", reason="playwright comes with the dev extra: pip install -e '.[dev]'")
    return str(found)


@dataclass
class PageLog:
    """What the page said: console errors and uncaught exceptions."""

    errors: list[str] = field(default_factory=list)


@contextmanager
def browser() -> Iterator[Any]:
    """A headless chromium (playwright Browser), closed after the block."""
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=executable, args=FLAGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


def new_page(instance: Any, width: int = 1280, height: int = 900) -> tuple[Any, PageLog]:
    """A page that records console errors and page errors."""
    page = instance.new_page(viewport={"width": width, "height": height})
    log = PageLog()
    page.on("console", lambda message: log.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: log.errors.append(str(error)))
    return page, log


def image_widths(page: Any) -> list[dict[str, Any]]:
    """Every <img> of the page: its source (cut for messages), whether it loaded, its natural width."""
    return page.evaluate("""[...document.images].map(i => ({src: i.getAttribute('src').slice(0, 60),
                                                            complete: i.complete, width: i.naturalWidth}))""")


def keep_screenshot(path: Path, name: str) -> None:
    """Copy a test's screenshot to docs/img/ when WINNOW_UPDATE_SCREENSHOTS=1 (the README shows it)."""
    if os.environ.get(UPDATE_SCREENSHOTS_ENV) == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMG / name)
