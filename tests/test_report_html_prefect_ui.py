"""The report artifact in Prefect's real UI: `prefect server start`, the run's artifacts published from a
flow, the artifact page opened in headless chromium: every plot loads (data URIs), the tables render.

Slow (a Prefect server start is 15-70 s on a loaded 2-core machine): `pytest -m slow tests/test_report_html_prefect_ui.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.browser import browser, image_widths, keep_screenshot, new_page
from tests.synthetic_run import curated_run
from tests.test_flows import _free_port, _wait_for

pytestmark = pytest.mark.slow


def test_report_artifact_renders_with_its_plots_in_the_prefect_ui(tmp_path: Path) -> None:
    import httpx
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.artifacts import artifact_key, publish_run_artifacts

    catalog, run_id, result = curated_run(tmp_path / "ws")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=open(tmp_path / "server.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(f"{api}/health", 180)

        @flow(name="publish-report")
        def publish() -> dict:
            return publish_run_artifacts(catalog, run_id, {"report": str(result.report_path)})

        with temporary_settings({PREFECT_API_URL: api}):
            assert publish()["artifact"] == artifact_key(run_id, "report")
        found = httpx.post(f"{api}/artifacts/filter",
                           json={"artifacts": {"key": {"any_": [artifact_key(run_id, "report")]}}}).json()
        assert len(found) == 1 and found[0]["type"] == "markdown"
        with browser() as instance:
            page, log = new_page(instance, 1400, 1000)
            page.goto(f"http://127.0.0.1:{port}/artifacts/artifact/{found[0]['id']}")
            page.wait_for_function("document.images.length >= 3 && [...document.images].every(i => i.complete)",
                                   timeout=60_000)
            images = image_widths(page)
            text = page.inner_text("body")
            shot = tmp_path / "prefect-artifact.png"
            page.screenshot(path=str(shot), full_page=True)
            keep_screenshot(shot, "prefect-artifact.png")
        plots = [i for i in images if i["src"].startswith("data:image/png")]
        assert len(plots) >= 3 and all(i["width"] > 0 for i in plots), images
        assert "Decisions by reason and stage" in text and "beta_outlier_low" in text
        # the UI's own console errors (a 404 for an optional endpoint) are not the report's: none names an image
        assert not [e for e in log.errors if "data:image" in e or "img" in e.lower()], log.errors
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        time.sleep(0.1)
