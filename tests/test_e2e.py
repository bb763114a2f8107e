"""End to end in a real browser: `streamlit run` on loopback, driven by Playwright in Debian's
chromium (installed by .ci/run; no `playwright install`). Screenshots go to
tests/screenshots/ (git-ignored)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).parent / "screenshots"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no browser at {CHROMIUM} (apt-get install chromium; .ci/run does)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt")
    data = tmp_path_factory.mktemp("e2e-data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FMMTC_DATA_DIR": str(data), "FMMTC_DEMO_COHORT_SIZE": "4"}
    env.pop("FMMTC_DATABASE_URL", None)
    log = open(data / "streamlit.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless",
         "true", "--server.address", "127.0.0.1", "--server.port", str(port),
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + (data / "streamlit.log").read_text()[-2000:])
    yield url, data, proc
    from conftest import live_descendants

    workers = live_descendants(proc.pid)  # the screening worker, once a page has screened
    proc.terminate()  # as a service manager stops the server
    proc.wait(timeout=30)
    log.close()
    deadline = time.time() + 15
    while workers and time.time() < deadline:
        time.sleep(0.2)
        workers = {pid: cmd for pid, cmd in workers.items() if _running(pid)}
    assert not workers, f"the server left its worker processes running: {workers}"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"])
        # 1280 px: the width the screenshots are judged at (a laptop screen)
        context = browser.new_context(viewport={"width": 1280, "height": 4000},
                                      accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(180_000)
        yield pg
        browser.close()


def _sidebar(pg) -> str:
    return pg.locator("[data-testid=stSidebar]").inner_text()


def test_a_bookmarked_page_opened_first_gets_the_frame(server, page):
    """Runs first, on the fresh server (as after a restart): a bookmarked page (not the
    landing page) shows the page names, the disclaimer and the wide layout. With the page
    scripts in pages/, Streamlit served pages/cohort.py on its own: sidebar "app, cohort,
    explore ...", no disclaimer, a narrow column."""
    url, data, proc = server
    pg = page
    pg.goto(f"{url}/cohort")
    pg.get_by_role("heading", name="Cohort review").wait_for()
    nav = pg.locator("[data-testid=stSidebarNav]").inner_text()
    assert "Cohort review" in nav and "Screen participant" in nav, nav
    assert "app" not in nav.split() and "cohort" not in nav.split(), nav
    assert "Not a medical device" in _sidebar(pg)
    width = pg.locator("[data-testid=stMainBlockContainer]").bounding_box()["width"]
    assert width > 900, f"narrow layout: the main column is {width:.0f} px wide at 1280 px"


def _shot(pg, name):
    pg.mouse.move(2, 2)  # no tooltip or plot tool bar from where the last click left it
    pg.wait_for_timeout(1500)  # let plots finish drawing
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_screen_explore_review_export_in_a_browser(server, page, hcpex_scans, tmp_path):
    url, data, proc = server
    pg = page
    pg.goto(url)
    pg.get_by_role("heading", name="Screen a participant").wait_for()
    _shot(pg, "01-screen-empty")

    pg.get_by_label("Study pseudonym").fill("PAIN-E2E")
    pg.locator("[data-testid=stFileUploader]").filter(has_text="Scan (").locator(
        "input[type=file]").set_input_files(str(hcpex_scans[1]))  # not the sidecar's
    pg.locator("[data-testid=stFileChip]").first.wait_for()  # the upload has finished
    pg.locator("[data-testid=stFileChipIconSpinner]").wait_for(state="detached")
    pg.get_by_role("button", name="Screen participant").click()
    pg.get_by_role("heading", name="Participant PAIN-E2E").wait_for()
    pg.get_by_text("Saved to the cohort as screening 1").wait_for()
    pg.get_by_text("Responder probability").first.wait_for()
    pg.locator("[data-testid=stImage] img").first.wait_for()  # the brain map was drawn
    pg.locator("[data-testid=stDataFrame]").first.wait_for()  # the top-regions table
    _shot(pg, "02-screen-result")
    assert not pg.get_by_text("Traceback").count()
    with pg.expect_download() as dl:
        pg.get_by_role("button", name="Download the report (HTML)").click()
    report = tmp_path / "report.html"
    dl.value.save_as(report)
    html = pg.context.new_page()
    html.goto(report.as_uri())
    html.get_by_text("PAIN-E2E").first.wait_for()
    _shot(html, "06-report-html")
    html.close()

    pg.get_by_role("link", name="Attribution explorer").click()
    pg.get_by_role("heading", name="Attribution explorer").wait_for()
    pg.get_by_text("IG gap").first.wait_for()
    pg.locator("[data-testid=stImage] img").first.wait_for()  # the brain map was drawn
    pg.locator("[data-testid=stPlotlyChart]").first.wait_for()  # the default view's chart
    _shot(pg, "03-explorer")

    pg.get_by_role("link", name="Cohort review").click()
    pg.get_by_role("heading", name="Cohort review").wait_for()
    pg.get_by_role("button", name="Add the simulated demo cohort (4 participants)").click()
    pg.get_by_text("It runs on the server").wait_for()  # what the user sees before leaving
    # it runs as a job: leave the page, refresh the browser, the sidebar follows it anyway
    pg.get_by_role("link", name="Scan quality").click()
    pg.get_by_role("heading", name="Scan quality").wait_for()
    pg.locator("[data-testid=stSidebar]").get_by_text("demo cohort").first.wait_for()
    pg.reload()
    pg.get_by_role("heading", name="Scan quality").wait_for()
    pg.locator("[data-testid=stSidebar]").get_by_text("demo cohort").first.wait_for()
    _qc_view(pg)
    pg.get_by_role("link", name="Cohort review").click()
    pg.get_by_role("heading", name="Cohort review").wait_for()
    pg.get_by_text("Loaded 4 simulated participants").wait_for(timeout=900_000)
    pg.get_by_role("heading", name="Worklist").first.wait_for()  # a rerun may briefly show two
    pg.locator("[data-testid=stDataFrame]").first.wait_for()
    _shot(pg, "04-cohort-worklist")
    with pg.expect_download() as dl:
        pg.get_by_role("button", name="Export these rows (CSV)").click()
    csv = tmp_path / "cohort.csv"
    dl.value.save_as(csv)
    table = pd.read_csv(csv)
    assert len(table) == 5 and "PAIN-E2E" in set(table["participant"])
    assert table["simulated"].sum() == 4

    pg.get_by_role("link", name="Model").click()
    pg.get_by_role("heading", name="Cross-validation metrics (out of fold)").wait_for()
    _shot(pg, "05-model")
    log = (data / "streamlit.log").read_text()
    assert "Traceback" not in log, log[-3000:]


def _qc_view(pg):
    """The Scan quality page on the simulated demo scan: verdict, numbers, alignment view."""
    pg.get_by_role("button", name="Use a simulated demo scan").click()
    pg.get_by_role("tab", name="Alignment and tSNR").wait_for()
    pg.get_by_text("Median tSNR").wait_for()
    pg.locator("[data-testid=stImage] img").first.wait_for()
    _shot(pg, "07-qc")
    assert not pg.get_by_text("Traceback").count()
