"""The page in a real browser: headless Chromium (Debian's chromium + chromium-driver, installed by .ci/run) against a
real `yolo-vq serve` subprocess: upload a frame, click a detection, get the tiles `yolo-vq search --json` lists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.serve.test_api import cli_json, frame_jpg  # noqa: F401  (the query frame fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium + chromedriver on this machine (Debian: "
                                "apt-get install chromium chromium-driver; .ci/run installs them)")


@pytest.fixture
def server(served, pose_model_path):
    index = served[0]
    proc = subprocess.Popen([sys.executable, "-m", "yolo_vq.cli", "serve", "--index", str(index), "--port", "0",
                             "--model", pose_model_path], env={**os.environ, "YOLO_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/ ..." once it listens
    url = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
    if not url:
        proc.kill()
        pytest.fail(f"yolo-vq serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    yield url.group(1), index
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(fn, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_upload_click_a_detection_and_see_the_clis_results(server, browser, frame_jpg, pose_model_path,  # noqa: F811
                                                           tmp_path):
    from selenium.webdriver.common.by import By

    url, index = server
    b = browser
    b.get(url)
    wait_for(lambda: "detections in" in b.find_element(By.ID, "info").text, "the index info")
    b.find_element(By.ID, "file").send_keys(str(frame_jpg))
    boxes = wait_for(lambda: b.find_elements(By.CSS_SELECTOR, ".det"), "detection boxes on the uploaded frame")
    boxes[0].click()
    tiles = wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#results .tile"), "result tiles")
    wait_for(lambda: not b.find_element(By.ID, "status").text, "the search to finish")
    shown = b.find_element(By.ID, "query-shown")
    box, k = shown.get_attribute("data-box"), b.find_element(By.ID, "k").get_attribute("value")
    ids = [int(t.get_attribute("data-id")) for t in b.find_elements(By.CSS_SELECTOR, "#results .tile")]
    expected = cli_json("--index", str(index), "--image", str(frame_jpg), "--crop", box, "--model", pose_model_path,
                        "-k", k)
    assert ids == [r["id"] for r in expected] and len(ids) == int(k) == len(tiles)
    wait_for(lambda: b.execute_script("return [...document.querySelectorAll('#results img')].every("
                                      "i => i.complete && i.naturalWidth > 0)"), "every tile's picture")
    shot = tmp_path / "serve.png"
    b.save_screenshot(str(shot))
    if os.environ.get("YOLO_VQ_SCREENSHOT"):  # how docs/serve.png is made
        shutil.copyfile(shot, os.environ["YOLO_VQ_SCREENSHOT"])
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    tiles[0].click()  # the frame viewer: the frame from the video, then the next one
    wait_for(lambda: b.find_element(By.ID, "viewer").is_displayed(), "the frame viewer")
    wait_for(lambda: b.execute_script("const i = document.getElementById('viewer-img');"
                                      "return i.complete && i.naturalWidth === 640"), "the frame picture")
    caption = b.find_element(By.ID, "viewer-caption").text
    assert f"detection {ids[0]}" in caption
    b.find_element(By.ID, "next-frame").click()
    wait_for(lambda: b.find_element(By.ID, "viewer-caption").text.startswith("frame "), "the next frame")
    b.find_element(By.ID, "close-viewer").click()

    b.find_element(By.ID, "detection").send_keys("999999")  # an API error shows as a readable message
    b.find_element(By.CSS_SELECTOR, "#by-id button").click()
    error = wait_for(lambda: b.find_element(By.ID, "error").text, "the error message")
    assert "404" in error and "no stored detection with id 999999" in error, error
    assert Path(index / "index.db").is_file()
