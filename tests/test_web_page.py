"""The web page (`GET /`) in a real headless Chromium, against the app served on loopback with fake backends.

The browser is Debian's `chromium` driven through Debian's `chromium-driver` by Selenium (`make test` installs both;
nothing is downloaded at test time). Where no Chromium or chromedriver is on the PATH, the browser tests are skipped
and say why; the page's HTTP tests run anyway. Each browser test saves a screenshot under its `tmp_path`, and copies
it to `$WEB_SCREENSHOT_DIR` when that is set.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from pydantic import SecretStr
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.command import Command
from selenium.webdriver.support.ui import Select, WebDriverWait

from orchestrator.analysis.messages import disclaimer
from orchestrator.api.app import create_app
from orchestrator.api.web import web
from orchestrator.settings import Settings
from orchestrator.wiring import Backends
from tests.fakes import RECEIPT_LINES, FakeStreamingReasoning, FakeVision, FakeWitness, text_line
from tests.servers import RunningServer, serving

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
HOSTILE_LINE = '<img src=x onerror="window.pwned=1">'
LINES = (*RECEIPT_LINES[:-1], HOSTILE_LINE, RECEIPT_LINES[-1])
VISION_ANSWER = f"Text in the image most relevant to the question: “{RECEIPT_LINES[-1]}”."
WAIT_S = 15
API_KEY = "s3cret-key"


def web_app(
    reasoning: FakeStreamingReasoning, settings: Settings | None = None, witness: FakeWitness | None = None
) -> FastAPI:
    """The app over fake backends, with the page's router (included here until `create_app` includes it)."""
    app = create_app(settings or Settings(), Backends(FakeVision(lines=LINES), reasoning, witness))
    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        app.include_router(web)
    return app


# ---- the page over HTTP (no browser)


def test_the_page_and_its_files_are_served_with_a_strict_content_security_policy() -> None:
    with TestClient(web_app(FakeStreamingReasoning())) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'src="web/app.js"' in page.text
        assert "http://" not in page.text  # nothing is fetched from elsewhere
        assert "https://" not in page.text
        script = client.get("/web/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in script.text
        assert client.get("/web/style.css").headers["content-type"].startswith("text/css")
        missing = client.get("/web/settings.py")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found"
        assert "/" not in client.get("/openapi.json").json()["paths"]


# ---- the page in a browser


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if CHROMIUM is None:
        pytest.skip("no Chromium on the PATH (chromium, chromium-browser, google-chrome); `make test` installs it")
    if CHROMEDRIVER is None:
        pytest.skip("no chromedriver on the PATH (Debian: chromium-driver); `make test` installs it")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small receipt-like PNG, drawn with Pillow."""
    image = Image.new("RGB", (240, 160), "white")
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(RECEIPT_LINES):
        draw.text((16, 24 + 40 * row), line, fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = tmp_path_factory.mktemp("web") / "receipt.png"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def reasoning() -> FakeStreamingReasoning:
    return FakeStreamingReasoning()


@pytest.fixture(scope="module")
def healthy(reasoning: FakeStreamingReasoning) -> Iterator[RunningServer]:
    with serving(web_app(reasoning)) as server:
        yield server


@pytest.fixture(scope="module")
def failing() -> Iterator[RunningServer]:
    """The reasoning stage breaks after two words of its answer."""
    with serving(web_app(FakeStreamingReasoning(fail_after=2))) as server:
        yield server


@pytest.fixture(scope="module")
def witnessed() -> Iterator[RunningServer]:
    """A second witness (OCR) that reads the total otherwise, on the first line: "TOTAL 59.06"."""
    witness = FakeWitness(lines=("TOTAL 59.06",))
    with serving(web_app(FakeStreamingReasoning(), witness=witness)) as server:
        yield server


@pytest.fixture(scope="module")
def keyed() -> Iterator[RunningServer]:
    """A service that needs the API key `API_KEY`."""
    with serving(web_app(FakeStreamingReasoning(), Settings(api_keys=SecretStr(API_KEY)))) as server:
        yield server


def open_page(browser: webdriver.Chrome, server: RunningServer, language: str = "en-US") -> None:
    """The page afresh, as a browser whose preferred language is `language` sees it on a first visit."""
    user_agent = browser.execute_script("return navigator.userAgent")
    browser.execute_cdp_cmd("Emulation.setUserAgentOverride", {"userAgent": user_agent, "acceptLanguage": language})
    browser.get(f"{server.url}/")
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    browser.refresh()


def fill(browser: webdriver.Chrome, image: Path, question: str, profile: str = "general") -> None:
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "question").send_keys(question)
    Select(browser.find_element(By.ID, "profile")).select_by_value(profile)


def state(browser: webdriver.Chrome) -> str:
    return str(browser.find_element(By.ID, "result").get_attribute("data-state"))


def wait_finished(browser: webdriver.Chrome) -> str:
    WebDriverWait(browser, WAIT_S).until(lambda _: state(browser) in {"done", "error", "stopped"})
    return state(browser)


def text(browser: webdriver.Chrome, element_id: str) -> str:
    """What a person sees of the element: its rendered text, empty when hidden."""
    return browser.find_element(By.ID, element_id).text


def column(browser: webdriver.Chrome, selector: str) -> list[str]:
    return [element.text for element in browser.find_elements(By.CSS_SELECTOR, selector)]


def console_errors(browser: webdriver.Chrome) -> list[str]:
    """The errors the page's console logged since the last call (a script error, a refused resource)."""
    entries = browser.execute(Command.GET_LOG, {"type": "browser"})["value"]
    return [str(entry["message"]) for entry in entries if entry["level"] == "SEVERE"]


def screenshot(browser: webdriver.Chrome, tmp_path: Path, name: str) -> Path:
    """The whole page as a PNG under `tmp_path`, copied to `$WEB_SCREENSHOT_DIR` when set."""
    chrome = int(browser.execute_script("return window.outerHeight - window.innerHeight"))
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.set_window_size(1280, max(900, height) + chrome)
    browser.execute_script("window.scrollTo(0, 0)")
    path = tmp_path / f"{name}.png"
    assert browser.save_screenshot(str(path))
    browser.set_window_size(1280, 900)
    target = os.environ.get("WEB_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
    return path


def test_a_reasoning_answer_streams_in_with_its_route_checks_and_disclaimer(
    browser: webdriver.Chrome,
    healthy: RunningServer,
    reasoning: FakeStreamingReasoning,
    image_file: Path,
    tmp_path: Path,
) -> None:
    open_page(browser, healthy)
    console_errors(browser)  # drop what loading logged so far
    fill(browser, image_file, "Why is the total 54.06?", profile="medical")
    reasoning.gate = gate = threading.Event()  # the stream pauses after its first word
    try:
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, WAIT_S).until(lambda _: text(browser, "answer") == "The")
        assert state(browser) == "running"
        assert text(browser, "status") == "The language model is writing…"
        assert "why" in text(browser, "route-reason")  # the route is shown before the answer is complete
        assert browser.find_element(By.ID, "stop").is_enabled()
    finally:
        gate.set()
        reasoning.gate = None
    assert wait_finished(browser) == "done"

    assert text(browser, "answer") == "The total is 54.06."
    assert text(browser, "route-decision") == "Vision, then reasoning"
    assert "reasoning cue “why”" in text(browser, "route-reason")
    assert text(browser, "arbitration-status") == "Needs review"  # medical answers always do
    (row,) = browser.find_elements(By.CSS_SELECTOR, "#checks tbody tr")
    claim, referent, verdict, _, evidence = (cell.text for cell in row.find_elements(By.TAG_NAME, "td"))
    assert (claim, referent, verdict) == ("54.06", "total", "supported")
    assert "TOTAL 54.06" in evidence
    assert text(browser, "disclaimer") == disclaimer("medical", "en")
    assert text(browser, "badge-review") == "Needs human review"
    assert text(browser, "degraded") == ""
    assert column(browser, "#timings dt") == ["Routing", "Vision", "Reasoning", "Claim checks", "Total"]
    assert all(value.endswith(" ms") for value in column(browser, "#timings dd"))
    # The image's text is shown as text: the markup in it is neither parsed nor run.
    assert HOSTILE_LINE in text(browser, "vision-description")
    assert [image.get_attribute("id") for image in browser.find_elements(By.CSS_SELECTOR, "#result img")] == [
        "evidence-image"  # the uploaded image itself, under its evidence; nothing the image's text made
    ]
    assert browser.execute_script("return window.pwned") is None
    assert console_errors(browser) == []
    screenshot(browser, tmp_path, "web-page-en")


def test_a_failing_reasoning_stage_shows_the_error_and_a_degraded_vision_answer(
    browser: webdriver.Chrome, failing: RunningServer, image_file: Path, tmp_path: Path
) -> None:
    open_page(browser, failing)
    fill(browser, image_file, "Why is the total 54.06?")
    browser.find_element(By.ID, "submit").click()
    assert wait_finished(browser) == "done"

    assert text(browser, "answer") == VISION_ANSWER  # the two streamed words are replaced
    assert text(browser, "replaced") == "The streamed text was replaced by the final answer."
    assert text(browser, "degraded") == "Degraded: the language model failed, so this is the vision stage's answer."
    assert text(browser, "error-heading") == "A stage failed mid-answer"
    assert text(browser, "error-title") == "The answer below comes from a fallback"
    assert text(browser, "error-type") == "reasoning_unavailable"
    assert "the fake stream broke" in text(browser, "error-message")
    assert text(browser, "notices")  # the service's own notice, in the question's language
    assert "reasoning stage (fake)" in text(browser, "failures")
    assert "Vision fallback answer" in column(browser, "#timings dt")
    screenshot(browser, tmp_path, "web-page-degraded")


def test_the_page_speaks_the_browsers_language_and_switches(
    browser: webdriver.Chrome, healthy: RunningServer, image_file: Path, tmp_path: Path
) -> None:
    open_page(browser, healthy, language="zh-CN")
    assert text(browser, "submit") == "提问"
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "zh-CN"
    fill(browser, image_file, "为什么总价是54.06？", profile="finance")
    browser.find_element(By.ID, "submit").click()
    assert wait_finished(browser) == "done"

    assert text(browser, "answer") == "The total is 54.06."  # shown as the service gave it
    assert text(browser, "route-decision") == "先视觉，后推理"
    assert column(browser, "#checks .verdict") == ["有依据"]
    assert text(browser, "disclaimer") == disclaimer("finance", "zh")
    assert text(browser, "badge-review") == "无需人工复核"
    screenshot(browser, tmp_path, "web-page-zh")

    browser.find_element(By.ID, "lang-toggle").click()
    assert text(browser, "submit") == "Ask"
    assert column(browser, "#checks .verdict") == ["supported"]
    assert text(browser, "answer") == "The total is 54.06."
    assert text(browser, "disclaimer") == disclaimer("finance", "zh")  # server text stays as given
    browser.refresh()
    assert text(browser, "submit") == "Ask"  # the choice outlives the visit


def test_an_http_error_is_shown_with_its_type_and_request_id(
    browser: webdriver.Chrome, healthy: RunningServer, tmp_path: Path
) -> None:
    open_page(browser, healthy)
    browser.find_element(By.ID, "submit").click()
    assert text(browser, "error-title") == "Choose an image first"  # refused before anything is sent

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"this is not an image")
    fill(browser, not_an_image, "What is the total?")
    browser.find_element(By.ID, "submit").click()
    assert wait_finished(browser) == "error"
    assert text(browser, "error-title").startswith("The service answered HTTP 4")
    assert text(browser, "error-type") in {"image_corrupt", "image_unsupported"}
    assert text(browser, "error-meta").startswith("Request id: ")
    assert text(browser, "status") == "Failed: see the error below."
    assert text(browser, "answer") == ""


def test_a_service_that_needs_a_key_asks_for_it_and_the_key_is_kept_for_the_tab(
    browser: webdriver.Chrome, keyed: RunningServer, image_file: Path
) -> None:
    open_page(browser, keyed)
    fill(browser, image_file, "What is the total?")
    browser.find_element(By.ID, "submit").click()
    assert wait_finished(browser) == "error"
    assert text(browser, "error-title") == "The service answered HTTP 401"
    assert text(browser, "error-type") == "api_key_missing"
    assert text(browser, "error-extra") == "The service needs an API key: enter it under “API key”."
    key = browser.switch_to.active_element  # the key field, opened and focused
    assert key.get_attribute("id") == "api-key"

    key.send_keys(API_KEY)
    browser.find_element(By.ID, "question").send_keys(Keys.CONTROL, Keys.ENTER)  # asks from the keyboard
    assert wait_finished(browser) == "done"
    assert text(browser, "answer") == VISION_ANSWER
    assert text(browser, "route-decision") == "Vision only"
    assert text(browser, "error") == ""

    browser.refresh()
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == API_KEY


def points(order: int) -> str:
    """The SVG points of the fakes' text line number `order` (`tests.fakes.text_line`)."""
    return " ".join(f"{x:g},{y:g}" for x, y in text_line("", order).box)


def cited(browser: webdriver.Chrome) -> list[tuple[str, str]]:
    """The highlighted boxes: (class, points) of each."""
    shapes = browser.find_elements(By.CSS_SELECTOR, "#evidence-cited polygon")
    return [(str(shape.get_attribute("class")), str(shape.get_attribute("points"))) for shape in shapes]


def test_the_image_shows_what_was_read_and_a_check_highlights_the_evidence_it_cites(
    browser: webdriver.Chrome, witnessed: RunningServer, tmp_path: Path
) -> None:
    width, height = 360, 60 + 50 * len(LINES)  # the fakes' line boxes, drawn where they say the lines are
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for order, line in enumerate(LINES):
        draw.text((46, 46 + 50 * order), line, fill="black")
    path = tmp_path / "tall-receipt.png"
    image.save(path)
    open_page(browser, witnessed)
    console_errors(browser)
    fill(browser, path, "Why is the total 54.06?")
    browser.find_element(By.ID, "submit").click()
    assert wait_finished(browser) == "done"

    assert browser.find_element(By.ID, "evidence-box").is_displayed()
    overlay = browser.find_element(By.ID, "evidence-overlay")
    assert browser.execute_script("return arguments[0].getAttribute('viewBox')", overlay) == f"0 0 {width} {height}"
    read = browser.find_elements(By.CSS_SELECTOR, "#evidence-overlay polygon.read-line")
    assert [shape.get_attribute("points") for shape in read] == [points(order) for order in range(len(LINES))]
    drawn = browser.find_element(By.ID, "evidence-image")
    assert drawn.get_attribute("naturalWidth") == str(width)
    assert overlay.size == drawn.size  # the overlay lies exactly over the image
    assert cited(browser) == []

    (row,) = browser.find_elements(By.CSS_SELECTOR, "#checks tbody tr")
    assert row.find_elements(By.TAG_NAME, "td")[2].text == "contradicted"  # the witness read 59.06
    away = browser.find_element(By.ID, "evidence-heading")
    total = f"{points(len(LINES) - 1)}"  # the vision stage's "TOTAL 54.06", its last line
    expected = [("cited", total), ("cited witness", points(0))]  # and the witness's, on its first
    ActionChains(browser).move_to_element(row).perform()
    assert cited(browser) == expected
    ActionChains(browser).move_to_element(away).perform()
    assert cited(browser) == []
    row.click()  # selected: stays highlighted
    ActionChains(browser).move_to_element(away).perform()
    assert cited(browser) == expected
    assert row.get_attribute("aria-selected") == "true"
    screenshot(browser, tmp_path, "web-page-evidence")
    row.send_keys(Keys.ENTER)  # the keyboard unselects it too
    assert row.get_attribute("aria-selected") == "false"
    ActionChains(browser).move_to_element(away).perform()
    assert cited(browser) == []
    assert console_errors(browser) == []
