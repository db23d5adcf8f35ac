"""The whole chain in a real browser: headless Debian Chromium (Selenium, /usr/bin/chromedriver)
-> the Streamlit page (`streamlit run ui/app.py`) -> the real TorchServe serving the seed-tiny
archive. Upload a fixture image, choose deterministic creativity, press the button, and the
golden greedy captions appear.

Needs Debian's Chromium and its driver (`apt-get install -y chromium chromium-driver`) and the
`selenium` package; without them this test FAILS (it never skips). Selenium Manager is never
asked for anything: the driver and browser paths are given explicitly.

The screenshot of the result is always written to the test's tmp folder; with
UPDATE_SCREENSHOT=1 it is also copied to docs/ui.png (how the committed one was made).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.e2e.seed import MODEL, SEED, seed_model_config
from tests.e2e.torchserve import REPO, TorchServe, free_ports

pytestmark = [pytest.mark.ui, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "apt-get update && apt-get install -y chromium chromium-driver"
IMAGE = "chelsea.png"
SCREENSHOT = REPO / "docs" / "ui.png"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--disable-quic", "--disable-extensions", "--disable-default-apps",
                  "--force-device-scale-factor=1", "--window-size=1360,1100")


def require_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"headless browser test needs Debian's Chromium and ChromeDriver; missing {', '.join(missing)}. "
                    f"Install them with: {INSTALL_HINT}", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("headless browser test needs the 'selenium' package: pip install 'selenium>=4.20'", pytrace=False)


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory):
    require_browser()  # before the slow part: fail fast when the browser is missing
    from export import build_archive

    root = tmp_path_factory.mktemp("ui-e2e")
    store = root / "model-store"
    store.mkdir()
    build_archive(SEED / "weights.pt", SEED / "config.json", model_name=MODEL, output=store,
                  model_config=seed_model_config(root / "config"), progress=lambda _line: None)
    # One intra-op thread: the browser and Streamlit share this test's CPU cores, and a 2-thread
    # OpenMP pool that loses a core to them waits at every barrier (seconds per request).
    with TorchServe(root / "ts", model_store=store, env={"OMP_NUM_THREADS": "1"}) as ts:
        ts.wait_model_ready(MODEL)
        # The page's request once first, so the latency it shows (and docs/ui.png) is a warm
        # worker's: the first greedy request after a start takes seconds, later ones ~0.3 s.
        image = base64.b64encode((SEED / "images" / IMAGE).read_bytes()).decode()
        warm = ts.infer(MODEL, json={"image": image, "temperature": 0.0, "num_captions": 1})
        assert warm.status_code == 200, warm.text
        yield ts


@pytest.fixture(scope="module")
def streamlit_app(torchserve, tmp_path_factory):
    """The page on a free port, configured only through the environment (the key by file)."""
    log_path = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    (port,) = free_ports(1)
    env = {**os.environ,
           "CAPTION_API_URL": torchserve.url("inference", ""),
           "CAPTION_MODEL": MODEL,
           "CAPTION_KEY_FILE": str(torchserve.workdir / "key_file.json"),
           "CAPTION_TIMEOUT": "60"}
    env.pop("CAPTION_API_KEY", None)
    command = [sys.executable, "-m", "streamlit", "run", "ui/app.py", "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"streamlit exited with {process.returncode}:\n{log_path.read_text(errors='replace')}")
            try:
                if requests.get(f"{url}/_stcore/health", timeout=2).text.strip() == "ok":
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit not healthy after 60 s:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.3)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import selenium_manager

    def no_manager(*_args, **_kwargs):
        raise AssertionError("Selenium Manager must not run (it would try to download a browser or driver)")

    monkeypatch.setattr(selenium_manager.SeleniumManager, "binary_paths", no_manager)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_caption_and_see_golden_greedy_captions(streamlit_app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    golden = json.loads((SEED / "expected_captions.json").read_text())[IMAGE]["greedy"]
    wait = WebDriverWait(browser, 60)
    browser.get(streamlit_app)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))

    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(SEED / "images" / IMAGE))
    wait.until(lambda d: IMAGE in d.find_element(By.CSS_SELECTOR, "[data-testid=stImage]").text)

    browser.find_element(By.XPATH, "//*[@data-testid='stRadio']//label[normalize-space()='Deterministic']").click()
    wait.until(EC.invisibility_of_element_located((By.XPATH, "//*[@data-testid='stSlider']")))
    button = browser.find_element(By.XPATH, "//button[normalize-space()='Caption it']")
    wait.until(lambda _d: button.is_enabled())
    button.click()

    def tab(name):
        return browser.find_element(By.XPATH, f"//*[@role='tab'][normalize-space()='{name}']")

    def shown_captions():
        return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "[data-testid=stCode]") if e.text]

    try:
        wait.until(lambda d: d.find_elements(By.XPATH, "//*[@role='tab']") or d.find_elements(
            By.CSS_SELECTOR, "[data-testid=stAlert]"))
        alerts = browser.find_elements(By.CSS_SELECTOR, "[data-testid=stAlert]")
        assert not alerts, f"the page shows an error: {alerts[0].text}"
        for name in ("Narrative", "Descriptive", "Concise"):  # end on the first tab for the screenshot
            tab(name).click()
            wait.until(lambda _d: shown_captions() == [golden[name.lower()]])
        latency = browser.find_element(By.XPATH, "//*[@data-testid='stMetric'][contains(., 'Latency')]").text
        assert latency.rstrip().endswith("ms"), latency
    finally:
        shot = tmp_path / "ui.png"
        browser.save_screenshot(str(shot))
        (tmp_path / "page.html").write_text(browser.page_source)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
