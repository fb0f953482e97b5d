"""The chat page in a real headless Chromium: send, watch the reply stream in, stop, start over.

Runs where Chromium and its chromedriver are installed (Debian: ``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them); elsewhere it is skipped with that reason. With
``BUILDLLM_SCREENSHOT=path.png`` it saves the page mid-answer (the README's picture).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("uvicorn")

from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_serve import NAME, ServerThread, chat_ids, expected, tiny_model_folder

from buildllm.serve.app import create_app
from buildllm.serve.config import ServeConfig
from buildllm.weights.loader import load_model

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver; .ci/run installs them)")


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A server whose model takes 30 ms a step, so the browser can watch the answer grow."""
    loaded = load_model(tiny_model_folder(tmp_path_factory.mktemp("page") / NAME))
    loaded.model.register_forward_hook(lambda *_: time.sleep(0.03))  # the prefill
    app = create_app(loaded, ServeConfig(), model_name=NAME)
    decode = app.state.engine._decode  # and each step (the C++ step skips the model's hooks)
    app.state.engine._decode = lambda busy: (time.sleep(0.03), decode(busy))[1]
    with ServerThread(app) as server:
        server.loaded = loaded
        yield server


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=900,700"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # the system's driver: no download
    yield driver
    driver.quit()


def test_chat_page_streams_stops_and_starts_over(slow_server, browser):
    import httpx

    find = lambda css: browser.find_element(By.CSS_SELECTOR, css)
    wait = WebDriverWait(browser, 20, poll_frequency=0.02)
    browser.get(slow_server.url + "/")
    wait.until(lambda _: find("#model").text == NAME)  # the model's name, from /v1/models

    for field, value in (("#temperature", "0"), ("#max-tokens", "100")):
        browser.execute_script("arguments[0].value = arguments[1]", find(field), value)
    question = "Hello, how are you?"
    find("#input").send_keys(question)
    find("#send").click()

    answer = wait.until(lambda _: find(".message.assistant.streaming"))
    first = wait.until(lambda _: answer.text.rstrip("▍") or None)
    grown = wait.until(lambda _: len(answer.text.rstrip("▍")) > len(first) and answer.text.rstrip("▍"))
    assert find("#send").get_attribute("disabled") and not find("#stop").get_attribute("disabled")
    if os.environ.get("BUILDLLM_SCREENSHOT"):
        wait.until(lambda _: len(answer.text) > 40)
        browser.save_screenshot(os.environ["BUILDLLM_SCREENSHOT"])

    find("#stop").click()
    wait.until(lambda _: "streaming" not in answer.get_attribute("class"))
    assert find("#status").text == "stopped" and not find("#send").get_attribute("disabled")
    stopped = answer.text
    full, _, _ = expected(slow_server.loaded, chat_ids(slow_server.loaded, [{"role": "user", "content": question}]),
                          100)
    assert len(grown) <= len(stopped) < len(full) and full.startswith(stopped)  # a true prefix: cut short
    wait.until(lambda _: httpx.get(slow_server.url + "/health").json()["running"] == 0)  # its slot is free
    time.sleep(0.2)
    assert answer.text == stopped  # nothing arrives after Stop

    find("#new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
    browser.execute_script("arguments[0].value = '3'", find("#max-tokens"))
    find("#input").send_keys("The cat")
    find("#send").click()
    # The new chat sends only its own message: the prompt is that one message's tokens.
    prompt_tokens = len(chat_ids(slow_server.loaded, [{"role": "user", "content": "The cat"}]))
    wait.until(lambda _: find("#status").text.startswith(f"{prompt_tokens} prompt tokens, "))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 2
