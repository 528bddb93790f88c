"""Open the HTML report in headless Chromium: no console errors, every image loads, no injected script
runs (with and without the page's Content-Security-Policy), and nothing overflows a 400 px window.

Needs the Debian packages ``chromium`` and ``chromium-driver`` and the ``selenium`` package; skipped with
the reason when they are absent. Screenshots are saved in the test's temp folder.
"""
from __future__ import annotations

import shutil
import tempfile

import pytest

from memtrack.report.html import render_html
from report_samples import make_gallery, make_summary

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found (apt-get install chromium)"),
    pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver not found (apt-get install chromium-driver)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900"]
CSP = "<meta http-equiv=\"Content-Security-Policy\""


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="memtrack-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, path):
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.get_log("browser")                     # drop what earlier pages logged
    driver.get(path.as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]


def injected_ran(driver) -> bool:
    return driver.execute_script("return typeof window.__pwned !== 'undefined'")


def broken_images(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
        ".map(i => i.alt)")


def screenshot(driver, path, width: int) -> None:
    """A full-page screenshot at ``width`` CSS px (device emulation: a headless window is >= 500 px)."""
    metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {**metrics, "height": min(height, 16000)})
    assert driver.save_screenshot(str(path))


def overflow(driver) -> int:
    return driver.execute_script("const d = document.documentElement; return d.scrollWidth - d.clientWidth")


def test_report_renders_without_errors_and_images_load(browser, tmp_path):
    page = tmp_path / "report.html"
    gallery = make_gallery()
    page.write_text(render_html(make_summary(), gallery), encoding="utf-8")
    open_page(browser, page)
    assert console_errors(browser) == []
    n_images = sum(1 for g in gallery for k in ("sample_png", "train_png") if g.get(k)) + 2  # + blend A and B
    assert browser.execute_script("return document.images.length") == n_images
    assert broken_images(browser) == []
    assert not injected_ran(browser)
    assert browser.execute_script("return document.querySelectorAll('section svg.chart').length") >= 7
    screenshot(browser, tmp_path / "report-wide.png", 1280)
    assert overflow(browser) <= 0
    screenshot(browser, tmp_path / "report-narrow.png", 400)
    assert overflow(browser) <= 0, "the page scrolls sideways in a 400 px window"
    assert (tmp_path / "report-wide.png").stat().st_size > 10_000


def test_escaping_alone_stops_injected_scripts(browser, tmp_path):
    """The CSP would block inline scripts anyway; strip it so the test proves the escaping."""
    html = render_html(make_summary(), make_gallery())
    assert CSP in html
    start = html.index(CSP)
    page = tmp_path / "no-csp.html"
    page.write_text(html[:start] + html[html.index(">", start) + 1:], encoding="utf-8")
    open_page(browser, page)
    browser.execute_script("document.querySelectorAll('svg rect, svg circle').forEach(e => "
                           "e.dispatchEvent(new MouseEvent('mouseover')))")
    assert not injected_ran(browser)
    assert browser.execute_script("return document.querySelectorAll('iframe, script').length") == 0
    assert console_errors(browser) == []


def test_run_comparison_renders(browser, tmp_path):
    a, b = make_summary("no-dedup", shift=-1500), make_summary("dedup", shift=1500, seed=1, with_identities=False)
    page = tmp_path / "compare.html"
    page.write_text(render_html(a, make_gallery(), runs=[a, b]), encoding="utf-8")
    open_page(browser, page)
    assert console_errors(browser) == [] and broken_images(browser) == [] and not injected_ran(browser)
    lines = browser.execute_script(
        "return document.querySelector('figure[data-metric=nn_ratio]').querySelectorAll('polyline').length")
    assert lines == 2
    screenshot(browser, tmp_path / "compare-narrow.png", 400)
    assert overflow(browser) <= 0
