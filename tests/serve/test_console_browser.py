"""The web console in Debian's chromium (headless, via Selenium and /usr/bin/chromedriver).

Real LiveSession (random weights, 256 px, in-process). The test enters the token, clicks on the
live frame, and sees the object appear with its mask area in the page and in the API's record.
It fails (never skips) when chromium is missing: `.ci/run` installs it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from masklet.deploy.serve_app import create_app
from masklet.pipeline.config import ServeSettings
from tests.serve.conftest import TOKEN, Client, LoopbackServer, wait_for
from tests.serve.live_fixtures import real_live_session

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")


@pytest.fixture()
def browser(tmp_path):
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "Debian's chromium and chromium-driver are required: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def shown_frame_width(browser, frame) -> int:
    """Width of the video frame drawn on the console's canvas; 0 before the first one."""
    return browser.execute_script("return arguments[0].dataset.frameIdx === undefined ? 0 : arguments[0].width", frame)


def wait_for_prompts(browser, fake, count: int, what: str) -> None:
    try:
        wait_for(lambda: len(fake.prompts) == count, message=what)
    except AssertionError as exc:  # say what the page showed, not only that nothing arrived
        status = browser.execute_script("return document.getElementById('status').textContent")
        raise AssertionError(f"{exc}; prompts so far {fake.prompts!r}; page status {status!r}") from None


def test_click_on_the_frame_adds_an_object_whose_mask_shows_in_page_and_api(browser, clip):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    session = real_live_session()
    try:
        with LoopbackServer(create_app(session, ServeSettings(), token=TOKEN)) as server:
            client = Client(server.url)
            assert client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "loop": True}).status_code == 201

            browser.get(server.url + "/")
            token_input = browser.find_element(By.ID, "token")
            assert token_input.is_displayed()  # the page asks for the token first
            token_input.send_keys(TOKEN)
            browser.find_element(By.ID, "token-save").click()
            assert browser.execute_script("return sessionStorage.getItem('masklet-token')") == TOKEN

            frame = browser.find_element(By.ID, "frame")
            wait_for(lambda: shown_frame_width(browser, frame) == 96, timeout=60, message="live frame in the page")
            # a plain click (no drag, no shift) is a positive point: the first one adds object 1
            ActionChains(browser).move_to_element_with_offset(frame, 10, 0).click().perform()
            # the list is re-rendered every second: read it with one script, never hold its elements
            read_object = """const li = document.querySelector("#objects li[data-object-id='1']");
                return li && {area: Number(li.dataset.area), score: li.querySelector('.score').textContent};"""
            shown = wait_for(lambda: (o := browser.execute_script(read_object)) and o["area"] > 0 and o,
                             timeout=60, message="object 1 with a non-empty mask in the page")
            assert shown["score"] != "-"  # its presence score is shown

            record = client.get("/streams/cam1/masklet").json()
            [obj] = [o for o in record["objects"] if o["object_id"] == 1]
            assert obj["area"] > 0 and obj["rle"]["size"] == [64, 96]
            assert browser.find_element(By.ID, "status").text.startswith("add object 1 at frame")

            # remove it from the page
            browser.execute_script("document.querySelector(\"#objects li[data-object-id='1'] .remove\").click()")
            wait_for(lambda: "1" not in client.get("/streams/cam1").json()["objects"], timeout=30,
                     message="object removed")
    finally:
        session.shutdown()


def test_shift_click_refines_with_a_negative_point_and_drag_draws_a_box(browser, clip):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from tests.serve.fake_session import FakeLiveSession

    fake = FakeLiveSession()
    with LoopbackServer(create_app(fake, ServeSettings(), token=TOKEN)) as server:
        client = Client(server.url)
        client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "loop": True})
        browser.get(server.url + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "token-save").click()
        frame = browser.find_element(By.ID, "frame")
        wait_for(lambda: shown_frame_width(browser, frame) == 96, timeout=30, message="live frame")
        # While frames are swapped (every 250 ms) the frame's size must never drop out: a click
        # landing on a frame "between images" used to be dropped silently.
        samples = browser.execute_async_script("""
            const [canvas, done] = arguments, seen = [];
            const sample = () => { seen.push([canvas.width, Number(canvas.dataset.frameIdx)]);
                                   if (seen.length < 150) setTimeout(sample, 10); else done(seen); };
            sample();""", frame)
        assert {width for width, _ in samples} == {96}, samples
        assert len({idx for _, idx in samples}) > 1, f"no new frame was drawn while sampling: {samples}"
        ActionChains(browser).move_to_element_with_offset(frame, -20, -10).click().perform()
        wait_for_prompts(browser, fake, 1, "add")
        ActionChains(browser).key_down(Keys.SHIFT).move_to_element_with_offset(frame, -20, -10).click() \
            .key_up(Keys.SHIFT).perform()
        wait_for_prompts(browser, fake, 2, "refine")
        browser.find_element(By.ID, "new-object").click()
        ActionChains(browser).move_to_element_with_offset(frame, 5, 0).click_and_hold() \
            .move_by_offset(30, 20).release().perform()
        wait_for_prompts(browser, fake, 3, "box")
    add, refine, box = fake.prompts
    assert add.action == "add" and add.labels == [1] and add.object_id == 1
    assert refine.action == "refine" and refine.labels == [0] and refine.object_id == 1
    assert refine.points == add.points and add.frame_idx >= 0
    assert box.action == "add" and box.object_id == 2 and box.box is not None
    x0, y0, x1, y1 = box.box
    assert x0 < x1 and y0 < y1 and all(0 <= v <= 96 for v in (x0, x1)) and all(0 <= v <= 64 for v in (y0, y1))


class StatusRecorder:
    """ASGI wrapper recording (path, status) of every response of the app it wraps."""

    def __init__(self, app) -> None:
        self.app, self.seen = app, []

    async def __call__(self, scope, receive, send):
        async def recording_send(message):
            if message["type"] == "http.response.start":
                self.seen.append((scope.get("path"), message["status"]))
            await send(message)

        await self.app(scope, receive, recording_send)


def test_a_frame_the_console_has_is_revalidated_not_downloaded_again(browser, clip):
    """frame.jpg carries an ETag and `private, no-cache`: once a stream stops publishing, the browser
    asks with If-None-Match and the API answers 304 with no body."""
    from selenium.webdriver.common.by import By

    from tests.serve.fake_session import FakeLiveSession

    fake = FakeLiveSession()
    app = StatusRecorder(create_app(fake, ServeSettings(), token=TOKEN))
    with LoopbackServer(app) as server:
        client = Client(server.url)
        client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "realtime": False})
        wait_for(lambda: client.get("/streams/cam1").json()["state"] == "finished", message="clip fed")
        browser.get(server.url + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "token-save").click()
        frame = browser.find_element(By.ID, "frame")
        wait_for(lambda: shown_frame_width(browser, frame) == 96, timeout=30, message="the last frame shown")

        def frames():
            return [status for path, status in app.seen if path == "/streams/cam1/frame.jpg"]

        answers = wait_for(lambda: len(f := frames()) >= 4 and f, timeout=30, message="the console polling")
        assert answers[0] == 200 and set(answers[1:]) == {304}, answers  # downloaded once, then revalidated
        assert int(browser.execute_script("return arguments[0].dataset.frameIdx", frame)) == 19
