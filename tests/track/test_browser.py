"""The MLflow UI on a finished search, as a user sees it: headless Chromium driven by Selenium.

`autosquash ui` serves a tiny search's store; the browser must list the search's parent run and its
trials, and show the front's plot (PNG and interactive HTML) among the parent run's artifacts.
Screenshots are kept in test-artifacts/. URLs follow MLflow 3.x's hash routes
(server/js/src/experiment-tracking/routes.ts): `#/experiments/<id>/runs[/<run_id>/artifacts/<path>]`.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from autosquash.cli import main
from autosquash.track.mlflow_store import ROLE, TRIAL, default_tracking_uri, runs_page
from tests.conftest import SMOKE_TRIALS

ROOT = Path(__file__).parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TRIALS = SMOKE_TRIALS  # the session's smoke search: both seeded baselines and four sampled plans
SERVER_START_S = 120  # `mlflow ui` imports a lot; on a loaded 2-core machine it has taken 20 s
UI_WAIT_S = 60  # the SPA fetches runs and artifacts after load; the HTML plot is 4.6 MB of plotly
# The network is closed: without these Chromium waits on connections to Google's services.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
]
ML = "workflowType=machine_learning"  # MLflow 3 opens experiments in its GenAI view otherwise

pytestmark = [pytest.mark.integration, pytest.mark.browser]


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[WebDriver]:
    """Headless Chromium through Debian's chromedriver (given explicitly: Selenium Manager never downloads)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver (scripts/setup.sh does)"
        )
    for old in ARTIFACTS.glob("mlflow-ui-*.png"):  # a failed run's screenshots must not outlive a passing one
        old.unlink()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(UI_WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def search_out(smoke_run) -> Path:
    return smoke_run


@pytest.fixture(scope="module")
def runs(search_out) -> dict:
    """What the search logged: the experiment id, the parent run and the trial runs (id -> name)."""
    client = MlflowClient(default_tracking_uri(search_out))
    exp = client.get_experiment_by_name("smoke")
    logged = client.search_runs([exp.experiment_id])
    parents = [r for r in logged if r.data.tags.get(ROLE) == "search"]
    trials = sorted((r for r in logged if r.data.tags.get(ROLE) == "trial"), key=lambda r: int(r.data.tags[TRIAL]))
    assert len(parents) == 1 and len(trials) == TRIALS
    return {
        "experiment_id": exp.experiment_id,
        "parent": (parents[0].info.run_id, parents[0].info.run_name),
        "trials": [(r.info.run_id, r.info.run_name) for r in trials],
        "front": [r.info.run_id for r in trials if r.data.tags.get("autosquash.pareto") == "true"],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_url(search_out, tmp_path_factory) -> Iterator[str]:
    """`autosquash ui` on a free localhost port, in its own process group so that all of it stops."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("ui") / "ui.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}  # the network is closed
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autosquash", "ui", "--out", str(search_out), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"autosquash ui exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"autosquash ui did not answer on {url} within {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _wait(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str, name: str) -> Any:
    """condition(driver) once truthy; otherwise a failure that says what was missing, with a screenshot."""
    try:
        return WebDriverWait(driver, UI_WAIT_S).until(condition)
    except TimeoutException:
        shot = _screenshot(driver, f"{name}-failed")
        pytest.fail(f"MLflow UI at {driver.current_url}: {what} not shown within {UI_WAIT_S} s (screenshot: {shot})")


def _screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"mlflow-ui-{name}.png"
    driver.save_screenshot(str(path))
    return path


def _keep_screenshot(driver: WebDriver, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = _screenshot(driver, name)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")


def _close_assistant(driver: WebDriver) -> None:
    """Close MLflow's assistant side panel, should it be open, so the screenshot shows the page."""
    for button in driver.find_elements(
        By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"
    ):
        button.click()


def _row(run_id: str) -> str:
    return f"div[role='row'][row-id='{run_id}']"  # the runs table (ag-grid) keys its rows by run id


def test_experiment_page_lists_the_search_and_its_trials(browser, ui_url, runs, capsys):
    parent_id, parent_name = runs["parent"]
    browser.get(f"{ui_url}/#/experiments/{runs['experiment_id']}/runs?{ML}")
    row = _wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, _row(parent_id)),
        f"the search's parent run {parent_name}",
        "runs",
    )
    assert parent_name in row.text
    # Trials are nested under the parent and start collapsed: expand them as a user would.
    row.find_element(By.CSS_SELECTOR, "[col-id*='Run Name'] button").click()
    for run_id, name in runs["trials"]:
        trial = _wait(
            browser, lambda d, r=run_id: d.find_element(By.CSS_SELECTOR, _row(r)), f"trial run {name}", "runs"
        )
        link = trial.find_element(By.CSS_SELECTOR, f"a[href*='/runs/{run_id}']")
        assert link.text == name
    _close_assistant(browser)
    _keep_screenshot(browser, "runs", capsys)


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (PNG spec, section 11.2.2)."""
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_parent_run_artifacts_show_the_front_plot(browser, ui_url, runs, search_out, capsys):
    parent_id, _ = runs["parent"]
    artifacts = f"{ui_url}/#/experiments/{runs['experiment_id']}/runs/{parent_id}/artifacts"

    browser.get(f"{artifacts}/pareto.png?{ML}")
    image = _wait(
        browser,
        lambda d: next(
            (i for i in d.find_elements(By.CSS_SELECTOR, "img[alt='pareto.png']") if i.get_property("naturalWidth")),
            None,
        ),
        "the front's PNG, loaded",
        "pareto-png",
    )
    # The browser decoded the very file the search wrote, and it takes room on the page.
    assert (image.get_property("naturalWidth"), image.get_property("naturalHeight")) == _png_size(
        search_out / "pareto.png"
    )
    assert image.is_displayed() and image.size["width"] > 300 and image.size["height"] > 200
    _close_assistant(browser)
    _keep_screenshot(browser, "pareto-png", capsys)

    # The artifact view reads its path once, on load: pick the HTML in the file tree, as a user would.
    _wait(
        browser,
        lambda d: d.find_element(By.XPATH, "//*[normalize-space(text())='pareto.html']"),
        "pareto.html in the artifact tree",
        "pareto-html",
    ).click()
    frame = _wait(
        browser,
        lambda d: d.find_element(By.CSS_SELECTOR, "iframe.mlflow-html-iframe"),
        "the HTML viewer",
        "pareto-html",
    )
    browser.switch_to.frame(frame)
    legend = _wait(
        browser,
        lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".legendtext")] or None,
        "the plotly front, drawn",
        "pareto-html",
    )
    assert legend == ["searched plans", "baseline plans", "best in this view"]
    assert browser.find_element(By.CSS_SELECTOR, ".gtitle").text.startswith("smoke: perplexity against size")
    markers = browser.find_elements(By.CSS_SELECTOR, ".scatterlayer .point")
    assert len(markers) == 2 * TRIALS  # one marker per finished trial in each view (weights, peak memory)
    browser.switch_to.default_content()
    _close_assistant(browser)
    _keep_screenshot(browser, "pareto-html", capsys)


def _texts(driver: WebDriver, css: str) -> list[str]:
    return [
        " ".join((e.get_attribute("textContent") or "").split()) for e in driver.find_elements(By.CSS_SELECTOR, css)
    ]


def test_the_page_ui_prints_shows_the_runs_with_their_metric_columns(browser, ui_url, runs, search_out, capsys):
    """The address `autosquash ui` prints opens the experiment on its runs (not MLflow 3's GenAI overview), with
    the metrics a user sorts by as columns; trial runs are named for what they are."""
    parent_id, _ = runs["parent"]
    page = runs_page(default_tracking_uri(search_out), ui_url)
    assert "viewStateShareKey=" in page
    browser.set_window_size(2600, 1000)  # the grid draws only the columns in view: room for all of them
    browser.get(page)
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, _row(parent_id)), "the runs table", "columns")
    assert "/runs" in browser.current_url and "genai" not in browser.current_url
    _close_assistant(browser)
    wanted = {"kl", "perplexity", "weights_mb", "memory_mb", "energy_mj_per_token", "tokens_per_s", "pareto"}
    headers = _wait(
        browser,
        lambda d: (h := set(_texts(d, "[role='columnheader']"))) >= wanted and h,
        f"metric columns {sorted(wanted)}",
        "columns",
    )
    assert wanted <= headers
    for run_id, name in runs["trials"]:  # sorted by KL, the trials are listed each on its own row
        assert name.startswith("t") and " MB kl " in name  # e.g. "t2 mixed 1.9 MB kl 0.0123"
        _wait(browser, lambda d, r=run_id: d.find_element(By.CSS_SELECTOR, _row(r)), f"trial run {name}", "columns")
    _keep_screenshot(browser, "runs-columns", capsys)
    browser.set_window_size(1600, 1000)


def test_the_search_run_describes_its_front_and_each_front_trial_has_its_layer_map(browser, ui_url, runs, capsys):
    parent_id, _ = runs["parent"]
    browser.get(f"{ui_url}/#/experiments/{runs['experiment_id']}/runs/{parent_id}?{ML}")
    _wait(
        browser,
        lambda d: "Export a plan as GGUF" in (d.find_element(By.TAG_NAME, "body").get_attribute("textContent") or ""),
        "the search run's description (the front and how to export)",
        "description",
    )
    cells = _texts(browser, "td")
    assert "weights MB" in " ".join(_texts(browser, "th")) and cells  # the front, as a markdown table
    _close_assistant(browser)
    _keep_screenshot(browser, "description", capsys)
    trial_id = runs["front"][0]
    number = next(int(n.split()[0][1:]) for r, n in runs["trials"] if r == trial_id)
    name = f"trial-{number:04d}.png"
    browser.get(f"{ui_url}/#/experiments/{runs['experiment_id']}/runs/{trial_id}/artifacts/layers/{name}?{ML}")
    _wait(
        browser,
        lambda d: next(
            (i for i in d.find_elements(By.CSS_SELECTOR, f"img[alt$='{name}']") if i.get_property("naturalWidth")),
            None,
        ),
        "the front trial's layer map, loaded",
        "layer-map",
    )
    _close_assistant(browser)
    _keep_screenshot(browser, "layer-map", capsys)


def test_the_report_opens_offline_with_every_section(browser, search_out, tmp_path, capsys):
    """`autosquash report` as a user opens it: a file in the browser, with the network closed."""
    page = tmp_path / "report.html"
    assert main(["report", str(search_out), "--out", str(page)]) == 0
    browser.get(page.as_uri())
    headings = _wait(browser, lambda d: _texts(d, "h2") or None, "the report's sections", "report")
    front = list(csv.DictReader((search_out / "pareto.csv").open()))
    assert headings[:2] == ["Pareto front", "Quality against size"]
    assert [h.split(" (")[0] for h in headings[2:]] == [f"Trial {r['trial']}" for r in front]
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) == 1 + len(front) and all(i.get_property("naturalWidth") > 0 for i in images)  # all decoded
    _keep_screenshot(browser, "report", capsys)
