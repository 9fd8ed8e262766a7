"""The web page at / in headless Chromium (Debian's, driven by Playwright): a person uploads an
image, picks a task, asks, and sees the answer and which model version answered."""

from __future__ import annotations

import shutil

import pytest

from tests.serve.conftest import NAME, png_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 900, "height": 1200})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url + "/")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_upload_an_image_ask_and_see_the_answer_and_the_model(page, server, tmp_path):
    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(120, 100))
    version = server.version()
    page.wait_for_function("document.getElementById('model-badge').textContent.includes('version')")
    assert f"{NAME} version {version}" in page.inner_text("#model-badge")

    page.select_option("#task", "vqa")
    page.set_input_files("#image", str(image))
    page.fill("#question", "Is there a pleural effusion?")
    page.fill("#candidates", "yes, no")
    page.click("#ask")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert page.inner_text("#answer") in ("yes", "no")
    assert page.inner_text("#answered-by") == f"Answered by {NAME} version {version} (alias champion)"
    page.screenshot(path=str(tmp_path / "vqa.png"))

    page.select_option("#task", "ground")  # same image, another task: a box is drawn over it
    assert page.is_hidden("#question") and page.is_visible("#text")
    page.fill("#text", "the left lung")
    page.click("#ask")
    page.wait_for_function("document.getElementById('box').textContent.startsWith('Box')", timeout=120_000)
    assert "Box (pixels): [" in page.inner_text("#box")


def test_text_task_and_an_error_shown_to_the_person(page, server):
    page.select_option("#task", "nli")
    assert page.is_hidden("#image")
    page.fill("#premise", "the patient has a fever")
    page.fill("#hypothesis", "the patient is ill")
    page.click("#ask")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert page.inner_text("#answer") in ("yes", "no", "maybe")
    assert page.locator("#scores tr").count() == 3
    assert "Answered by galen-generalist version" in page.inner_text("#answered-by")

    page.fill("#premise", "   ")  # a blank premise: the server's 422 is shown, no answer
    page.click("#ask")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "Error 422" in page.inner_text("#error") and "premise is empty" in page.inner_text("#error")
    assert page.is_hidden("#result")

    page.select_option("#task", "caption")  # no image chosen: the page says so without asking the server
    page.click("#ask")
    page.wait_for_function("document.getElementById('error').textContent.includes('choose an image')")
