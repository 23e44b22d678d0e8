"""The report in a real browser: headless Chromium (Debian's ``chromium`` package) driven by
Playwright, in a 900 px wide window. The first screen must hold the verdict, its reasons and the
one-row-per-variant table; nothing may scroll sideways; plots must fit. A screenshot is kept
(``REPORT_SCREENSHOT=path`` copies it out for a person to look at).

Skipped, with the reason, where Chromium or Playwright is missing (.ci/run installs both).
"""

import os
import shutil
from pathlib import Path

import pytest

from test_report import build, run_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")

WIDTH, HEIGHT = 900, 1000


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        browser.close()


def test_first_screen_at_900_px(page, tmp_path):
    slow = {("feature", r, m): 3.0 for r in ("none", "presized") for m in ("graph", "compiled_graph")}
    loaded = "host load average 17.51 on 2 cores before the measurement: other work competed"
    res = build(tmp_path, device="cuda", evil=True, factor=slow, warnings=[loaded, loaded.replace("before", "after")])
    s, _, _ = run_pipeline(res)
    assert s["verdict"] == "FAIL"
    page.goto((res / "report.html").as_uri())
    # No sideways scroll: neither the page nor any table, figure or log is wider than the window.
    assert page.evaluate("document.documentElement.scrollWidth") <= WIDTH
    too_wide = page.evaluate("""() => [...document.querySelectorAll('table, img, pre, figure')]
        .filter(e => e.scrollWidth > e.clientWidth + 1 || e.getBoundingClientRect().right > window.innerWidth)
        .map(e => e.tagName + ': ' + (e.innerText || e.alt || '').slice(0, 60))""")
    assert too_wide == []
    # The first screen: verdict, the reasons naming what failed, and every variant's row.
    verdict = page.locator("h1 .verdict")
    assert verdict.inner_text() == "FAIL" and verdict.bounding_box()["y"] < 100
    first_reason = page.locator("ul.reasons li").first
    assert "3.0× slower" in first_reason.inner_text()
    overview = page.locator("table").first
    box = overview.bounding_box()
    assert box["y"] + box["height"] <= HEIGHT, "the per-variant table must fit the first screen"
    rows = overview.locator("tbody tr")
    assert rows.count() == len(s["variants"])
    assert "3.0× slower" in rows.nth(2).inner_text()
    # Legible plots: drawn at no more than the page's width, and not shrunk to a thumbnail.
    for img in page.locator("img").all():
        w = img.bounding_box()["width"]
        assert 300 <= w <= WIDTH
    shot = tmp_path / "report-900px.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    assert "Machine conditions" in page.content()
    if os.environ.get("REPORT_SCREENSHOT"):
        Path(os.environ["REPORT_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])
        page.screenshot(path=str(Path(os.environ["REPORT_SCREENSHOT"]).with_suffix(".full.png")), full_page=True)
