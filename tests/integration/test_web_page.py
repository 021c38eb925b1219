"""The web page at `/`, driven in a real browser (Debian's Chromium, headless) against the main stack.

One browser for the module, a fresh context (no storage, no key) per page. Every page leaves a
screenshot in `test-artifacts/web-page/` (`DREAMOMNI2_TEST_ARTIFACTS` moves the folder).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import (
    Browser,
    BrowserContext,
    FileChooser,
    LocatorAssertions,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from .conftest import Service
from .support import (
    LONG_STEPS,
    StoreSnapshot,
    assert_error,
    get_job,
    is_denoising,
    png_bytes,
    submit_json,
    submit_multipart,
    wait_for_job,
    wait_for_status,
)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("DREAMOMNI2_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("DREAMOMNI2_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "web-page"
#: How long (ms) a job of the tiny preset may take to show up as done in the page (it takes seconds).
JOB_TIMEOUT_MS = 60_000


@pytest.fixture(scope="session", autouse=True)
def chromium() -> str:
    """The system Chromium; its absence fails the tests (CI installs it), they never skip. Autouse and
    session-scoped, so that a missing browser fails at once, before the main stack starts."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"No Chromium at {CHROMIUM}: the web page's browser tests need it. "
            "Install it with `apt-get install chromium` (.ci/run does), or point DREAMOMNI2_CHROMIUM at one.",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    """One headless Chromium for the module; each page gets its own context."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--disable-dev-shm-usage"]
        )
        yield launched
        launched.close()


@dataclass
class WebPage:
    """One browser tab on the page, with the requests it made and the script errors it raised."""

    context: BrowserContext
    page: Page
    service: Service
    name: str
    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def open(self, owner: str | None = "alice") -> None:
        """Load the page, wait until it has read the service, and enter `owner`'s key (None: none)."""
        self.page.goto("/")
        expect(self.page.locator("#service-state")).to_contain_text("Ready")
        if owner is not None:
            self.page.get_by_label("API key").fill(self.service.keys[owner])

    def advanced(self, **values: str) -> None:
        """Open "Advanced" and fill its fields by label (steps=, seed=, ...)."""
        self.page.locator("#advanced").evaluate("details => { details.open = true; }")
        for name, value in values.items():
            self.page.get_by_label(name.capitalize(), exact=True).fill(value)

    def status(self) -> LocatorAssertions:
        return expect(self.page.locator("#job-status"))

    def job_id(self) -> str:
        return self.page.locator("#job-id").inner_text()

    def form_error(self) -> str:
        error = self.page.locator("#form-error .message")
        expect(error).to_be_visible()
        return error.inner_text()

    def screenshot(self, name: str | None = None) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name or self.name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def new_page(browser: Browser, service: Service, request: pytest.FixtureRequest) -> Iterator[Callable]:
    """`new_page(width=, height=, mobile=)`: a tab in a fresh context; screenshotted and closed after."""
    made: list[WebPage] = []

    def open_page(width: int = 1280, height: int = 900, mobile: bool = False) -> WebPage:
        context = browser.new_context(
            base_url=service.stack.url,
            viewport={"width": width, "height": height},
            is_mobile=mobile,
            has_touch=mobile,
            accept_downloads=True,
        )
        context.set_default_timeout(20_000)
        page = context.new_page()
        name = request.node.name + (f"-{len(made) + 1}" if made else "")
        web = WebPage(context, page, service, name)
        page.on("request", lambda sent: web.requests.append(sent))
        page.on("pageerror", lambda error: web.errors.append(str(error)))
        made.append(web)
        return web

    yield open_page
    for web in made:
        web.screenshot()
        web.context.close()
    for web in made:
        assert not web.errors, f"script errors on the page: {web.errors}"


def image_file(folder: Path, name: str, width: int, height: int, color: tuple[int, int, int]) -> Path:
    path = folder / name
    path.write_bytes(png_bytes(width, height, color))
    return path


def choose_by_keyboard(page: Page) -> FileChooser:
    """Focus the file input and press Space, as a keyboard user does; the chooser that opens.

    On a busy machine the first key press of a fresh browser is now and then lost before the page
    handles input: the press is repeated (a few seconds apart) rather than the test failing."""
    for attempt in range(3):
        page.focus("#file-input")
        expect(page.locator("#file-input")).to_be_focused()
        try:
            with page.expect_file_chooser(timeout=8_000) as chooser:
                page.keyboard.press("Space")
            return chooser.value
        except PlaywrightTimeoutError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def thumb_alts(page: Page) -> list[str]:
    return page.locator("#thumbs li img, #thumbs li .no-preview").evaluate_all(
        "nodes => nodes.map(n => n.getAttribute('alt') || n.getAttribute('aria-label'))"
    )


def test_two_image_edit_from_file_pick_to_download(service: Service, alice: httpx.Client, new_page, tmp_path):
    web = new_page()
    page = web.page
    web.open("alice")
    # Image 1 landscape, image 2 portrait: an edit's output takes image 1's shape, so the result
    # shows which one the page sent first.
    bag = image_file(tmp_path, "bag.png", 96, 64, (150, 40, 40))
    dress = image_file(tmp_path, "dress.png", 48, 80, (30, 60, 160))
    extra = image_file(tmp_path, "extra.png", 64, 64, (20, 160, 20))

    # Keyboard only: the file chooser opens from the focused file input.
    choose_by_keyboard(page).set_files([str(dress), str(bag), str(extra)])
    expect(page.locator("#thumbs li")).to_have_count(3)
    assert thumb_alts(page) == ["Image 1: dress.png", "Image 2: bag.png", "Image 3: extra.png"]

    page.get_by_role("button", name="Move image 2 (bag.png) earlier").press("Enter")
    # Focus stays with the image that moved (on a button it can still use).
    focused = page.evaluate("document.activeElement.getAttribute('aria-label')")
    assert focused == "Move image 1 (bag.png) later"
    page.get_by_role("button", name="Remove image 3 (extra.png)").press("Enter")
    assert thumb_alts(page) == ["Image 1: bag.png", "Image 2: dress.png"]
    expect(page.locator("#thumbs .badge")).to_have_text(["Image 1 · to edit", "Image 2 · reference"])
    expect(page.locator("#image-count")).to_have_text("(2 of at most 5)")

    instruction = "Make the bag in image 1 use the pattern of the dress in image 2."
    page.get_by_label("Instruction", exact=True).fill(instruction)
    web.advanced(steps="12")
    page.get_by_label("Instruction", exact=True).press("Control+Enter")

    web.status().to_contain_text("Succeeded", timeout=JOB_TIMEOUT_MS)
    # Every step arrived over the event stream, the last one included.
    expect(page.locator("#stages li")).to_have_text(
        ["Translate", "Encode", "Denoise: step 12 of 12", "Decode"]
    )
    first_id = web.job_id()
    job = get_job(alice, first_id)
    assert (job["status"], job["image_count"], job["adapter"], job["steps"]) == ("succeeded", 2, "edit", 12)
    assert job["result"]["width"] > job["result"]["height"], "image 1 was not the landscape bag"

    details = page.locator("#result-details")
    expect(details).to_contain_text(f"Seed{job['seed']}")  # the exact seed: it reproduces the image
    expect(details).to_contain_text("DreamOmni2 edit LoRA (edit)")
    expect(details).to_contain_text(job["prompt"])
    translation = "translator's rewrite was used" if job["translated"] else "used as is"
    expect(details).to_contain_text(translation)
    stages = ["translate", "encode", "denoise", "decode", "total"]
    expect(page.locator("#timings tbody th")).to_have_text(stages)

    with page.expect_download() as download:
        page.get_by_role("link", name=f"Download the result of job {first_id}").click()
    assert download.value.suggested_filename == f"dreamomni2-{first_id}.png"
    saved = ARTIFACTS / "download.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    download.value.save_as(saved)
    expected = alice.get(f"/v1/jobs/{first_id}/result").content
    assert saved.read_bytes() == expected
    assert Image.open(io.BytesIO(expected)).size == (job["result"]["width"], job["result"]["height"])
    web.screenshot("edit-result")

    # The same inputs with the same seed: a new job, the same image.
    page.get_by_role("button", name=f"Run again with seed {job['seed']}").click()
    expect(page.locator("#job-id")).not_to_have_text(first_id)
    web.status().to_contain_text("Succeeded", timeout=JOB_TIMEOUT_MS)
    again = get_job(alice, web.job_id())
    assert (again["seed"], again["steps"], again["image_count"]) == (job["seed"], 12, 2)
    assert alice.get(f"/v1/jobs/{again['id']}/result").content == expected

    # The result becomes image 1 of a new edit; the reference stays.
    page.get_by_role("button", name="Edit this result (it becomes image 1)").click()
    assert thumb_alts(page) == [f"Image 1: result-{again['id']}.png", "Image 2: dress.png"]
    assert page.evaluate("document.activeElement.id") == "instruction"
    expect(page.locator("#history li")).to_have_count(2)
    expect(page.locator("#history .status")).to_have_text(["succeeded", "succeeded"])


def test_cancel_while_running_and_while_queued(service: Service, alice: httpx.Client, new_page):
    web = new_page()
    page = web.page
    web.open("alice")
    page.get_by_label("Instruction", exact=True).fill("A long generation, to be canceled")
    web.advanced(steps=str(LONG_STEPS))
    page.get_by_role("button", name="Run", exact=True).click()
    web.status().to_contain_text("Running: Denoising, step", timeout=JOB_TIMEOUT_MS)
    running_id = web.job_id()
    # The image as it forms: the preview its progress events carry every few steps.
    preview = page.get_by_role("img", name="Preview of the image as it forms")
    expect(preview).to_be_visible()
    expect(preview).to_have_attribute("src", re.compile(r"^data:image/jpeg;base64,"))
    expect(page.locator("#preview-caption")).to_have_text(re.compile(r"^Preview at step \d+ of 2000$"))
    page.get_by_role("button", name="Cancel", exact=True).click()
    web.status().to_contain_text("Canceled", timeout=JOB_TIMEOUT_MS)
    expect(page.get_by_role("button", name="Cancel", exact=True)).to_be_hidden()
    expect(preview).to_be_hidden()
    expect(page.locator("#stages li.stopped")).to_have_text(re.compile(r"Denoise: step \d+ of 2000"))
    job = get_job(alice, running_id)
    assert (job["status"], job["cancel_reason"]) == ("canceled", "requested")
    assert job["started_at"] is not None and job["progress"]["step"] < LONG_STEPS

    # With the one worker busy, the page's job waits: its position shows, and a cancel ends it unrun.
    blocker = submit_json(alice, [], {"instruction": "Keep the worker busy", "steps": LONG_STEPS})
    assert blocker.status_code == 202, blocker.text
    blocker_id = blocker.json()["id"]
    wait_for_job(alice, blocker_id, lambda j: is_denoising(j, 1), what="the blocker", watch=service.core)
    web.advanced(steps="4")
    page.get_by_role("button", name="Run", exact=True).click()
    web.status().to_have_text("Queued: position 1 in the queue.")
    queued_id = web.job_id()
    assert queued_id != running_id
    page.get_by_role("button", name="Cancel", exact=True).click()
    web.status().to_contain_text("Canceled")
    job = get_job(alice, queued_id)
    assert (job["status"], job["started_at"]) == ("canceled", None)
    assert alice.post(f"/v1/jobs/{blocker_id}/cancel").status_code == 202
    wait_for_status(alice, blocker_id, watch=service.core)
    expect(page.locator("#history .status")).to_have_text(["canceled", "canceled"])


def test_refused_inputs_show_the_services_message(service: Service, alice: httpx.Client, new_page, tmp_path):
    web = new_page()
    page = web.page
    web.open("alice")
    before = StoreSnapshot.take(service.redis)
    instruction = page.get_by_label("Instruction", exact=True)

    # A text file named .png: no preview, and the service's refusal in place, naming image 1.
    notes = tmp_path / "notes.png"
    notes.write_text("These are meeting notes, not an image.\n")
    page.set_input_files("#file-input", str(notes))
    expect(page.locator("#thumbs .no-preview")).to_have_count(1)
    instruction.fill("Make it brighter")
    page.get_by_role("button", name="Run", exact=True).click()
    refused = submit_multipart(alice, [notes.read_bytes()], {"instruction": "Make it brighter"})
    assert web.form_error() == assert_error(refused, 422, "invalid_image")["message"]
    expect(page.locator("#form-error .code")).to_have_text("invalid_image (HTTP 422)")
    expect(page.locator("#thumbs li").first).to_have_class(re.compile("invalid"))
    web.screenshot("refused-image")
    page.get_by_role("button", name="Remove image 1 (notes.png)").click()

    # An instruction over the limit: the counter says so, the service's message says by how much.
    too_long = "a" * 2001
    instruction.fill(too_long)
    expect(page.locator("#instruction-count")).to_have_text("2001 of at most 2000 characters: 1 too many.")
    page.get_by_role("button", name="Run", exact=True).click()
    refused = submit_json(alice, [], {"instruction": too_long})
    assert web.form_error() == assert_error(refused, 422, "instruction_too_long")["message"]
    expect(instruction).to_have_attribute("aria-invalid", "true")
    expect(instruction).to_be_focused()

    # More images than the deployment takes.
    instruction.fill("Combine them")
    files = [image_file(tmp_path, f"tile-{n}.png", 32, 32, (40 * n, 90, 200)) for n in range(6)]
    page.set_input_files("#file-input", [str(f) for f in files])
    expect(page.locator("#images-warning")).to_contain_text("6 images: this service takes at most 5")
    page.get_by_role("button", name="Run", exact=True).click()
    refused = submit_multipart(alice, [f.read_bytes() for f in files], {"instruction": "Combine them"})
    assert web.form_error() == assert_error(refused, 422, "too_many_images")["message"]
    before.assert_unchanged(service.redis)

    # Not ready: a clear notice, gone once the service is back.
    unready = {"status": "unavailable", "redis": "ConnectionError: Connection refused."}
    page.route("**/readyz", lambda route: route.fulfill(status=503, json=unready))
    page.reload()
    notice = page.locator("#notice")
    expect(notice).to_contain_text("The service is not ready (job store: ConnectionError: Connection refused")
    page.unroute("**/readyz")
    page.get_by_role("button", name="Try again").click()
    expect(notice).to_be_hidden()

    # Unreachable: the notice, and the submission says nothing was sent.
    web.context.set_offline(True)
    instruction.fill("A red bag")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(notice).to_contain_text("cannot be reached")
    assert web.form_error() == "The service cannot be reached; nothing was sent. Try again shortly."
    web.context.set_offline(False)
    page.get_by_role("button", name="Try again").click()
    expect(notice).to_be_hidden()
    before.assert_unchanged(service.redis)


def break_off(route: Route, kept_until: list[str]) -> None:
    """Answer an event stream with its first third of events and half of the next, then end it."""
    body = route.fetch().text()  # the whole stream: it ends with the job
    events = [e for e in re.split(r"\r\n\r\n|\n\n", body) if "data:" in e]
    keep = events[: max(2, len(events) // 3)]
    ids = [line.split(":", 1)[1].strip() for e in keep for line in e.splitlines() if line.startswith("id:")]
    kept_until.append(ids[-1])
    torn = events[len(keep)][: len(events[len(keep)]) // 2]
    route.fulfill(
        status=200,
        headers={"content-type": "text/event-stream", "cache-control": "no-store"},
        body="\r\n\r\n".join(keep) + "\r\n\r\n" + torn,
    )


def test_the_api_key_flow(service: Service, alice: httpx.Client, new_page):
    web = new_page()
    page = web.page
    web.open(owner=None)
    key_field = page.get_by_label("API key")
    expect(key_field).to_be_visible()  # the deployment has keys: the page asks for one
    page.get_by_label("Instruction", exact=True).fill("A small red bag")
    web.advanced(steps="4")
    run = page.get_by_role("button", name="Run", exact=True)

    run.click()
    without = httpx.post(f"{service.stack.url}/v1/jobs", json={"instruction": "A small red bag"})
    assert web.form_error() == assert_error(without, 401, "missing_api_key")["message"]
    expect(key_field).to_be_focused()
    expect(key_field).to_have_attribute("aria-invalid", "true")

    key_field.fill("do2_not_a_key_of_this_service")
    run.click()
    expect(page.locator("#form-error .code")).to_have_text("invalid_api_key (HTTP 401)")
    assert web.form_error() == "The API key is not known to this service."

    key = service.keys["alice"]
    key_field.fill(key)
    # The first event stream breaks off mid-way (mid-event, even): the page must resume after the
    # last whole event it read, with Last-Event-ID, and miss nothing.
    resumed_after: list[str] = []
    page.route("**/v1/jobs/*/events", lambda route: break_off(route, resumed_after), times=1)
    run.click()
    web.status().to_contain_text("Succeeded", timeout=JOB_TIMEOUT_MS)
    job_id = web.job_id()
    expect(page.locator("#stages li")).to_have_text(["Translate", "Encode", "Denoise: step 4 of 4", "Decode"])
    expect(page.locator("#result-image")).to_be_visible()
    assert get_job(alice, job_id)["status"] == "succeeded"

    # The key is in this tab's storage only, unless asked to remember it on this device.
    storage = (
        "() => [sessionStorage.getItem('dreamomni2.apiKey'),"
        " localStorage.getItem('dreamomni2.apiKey.remembered')]"
    )
    assert page.evaluate(storage) == [key, None]
    page.get_by_label("Remember it on this device").check()
    assert page.evaluate(storage) == [key, key]
    page.get_by_label("Remember it on this device").uncheck()
    assert page.evaluate(storage) == [key, None]

    # No address ever carried a key; every API call carried it in the header, the stream included.
    assert web.requests
    for sent in web.requests:
        assert key not in sent.url and "not_a_key" not in sent.url, sent.url
    api_calls = {}
    for sent in web.requests:
        path = httpx.URL(sent.url).path
        if path.startswith(f"/v1/jobs/{job_id}") or (path == "/v1/jobs" and sent.method == "POST"):
            api_calls.setdefault(path, []).append(sent.all_headers().get("authorization"))
    assert set(api_calls) >= {"/v1/jobs", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/result"}
    assert api_calls["/v1/jobs"][:2] == [None, "Bearer do2_not_a_key_of_this_service"]
    assert api_calls["/v1/jobs"][-1] == f"Bearer {key}"
    assert api_calls[f"/v1/jobs/{job_id}/events"] == [f"Bearer {key}"] * 2
    streams = [r for r in web.requests if httpx.URL(r.url).path == f"/v1/jobs/{job_id}/events"]
    assert [r.all_headers().get("last-event-id") for r in streams] == [None, *resumed_after]
    assert api_calls[f"/v1/jobs/{job_id}/result"] == [f"Bearer {key}"]

    # A reload keeps the key for this tab, and the recent jobs with their status.
    page.reload()
    expect(key_field).to_have_value(key)
    entry = page.locator("#history li", has_text=job_id)
    expect(entry.locator(".status")).to_have_text("succeeded")
    # Another key does not see alice's job: the page says so in place.
    key_field.fill(service.keys["bob"])
    entry.get_by_role("button").click()
    expect(page.locator("#job-error .code")).to_have_text("job_not_found (HTTP 404)")
    expect(entry.locator(".status")).to_have_text("expired or not this key’s")


OVERFLOW = """() => {
  const width = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('body *')].filter(e => {
    const box = e.getBoundingClientRect();
    const outside = box.right > width + 0.5 || box.left < -0.5;
    return box.width > 0 && outside && !e.closest('.visually-hidden, .skip');
  }).map(e => `${e.tagName.toLowerCase()}#${e.id}.${e.className}`);
  return {scroll: document.documentElement.scrollWidth, width, wide: wide.slice(0, 8)};
}"""

UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
  .filter(e => !e.closest('[hidden]'))
  .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label') || e.textContent.trim()))
  .map(e => e.id || e.outerHTML.slice(0, 80))"""


def assert_fits(page: Page, width: int) -> None:
    layout = page.evaluate(OVERFLOW)
    assert layout["width"] == width
    assert layout["scroll"] <= width and not layout["wide"], f"wider than the screen: {layout}"


def test_phone_width_layout(service: Service, new_page, tmp_path):
    web = new_page(width=375, height=740, mobile=True)
    page = web.page
    web.open("alice")
    assert_fits(page, 375)
    name = "a-photo-with-a-very-long-file-name-straight-from-the-camera-roll-0001.png"
    first = image_file(tmp_path, name, 96, 64, (120, 40, 40))
    files = [first, image_file(tmp_path, "b.png", 64, 64, (9, 9, 9))]
    page.set_input_files("#file-input", [str(f) for f in files])
    web.advanced(steps="4")
    page.get_by_label("Instruction", exact=True).fill(
        "Make image 1 look like " + "a very long description " * 8
    )
    assert_fits(page, 375)
    assert page.evaluate(UNLABELLED) == [], "controls without an accessible name"

    page.get_by_role("button", name="Run", exact=True).click()
    web.status().to_contain_text("Succeeded", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#result-image")).to_be_visible()
    page.locator("#result").scroll_into_view_if_needed()
    assert_fits(page, 375)
    assert page.evaluate(UNLABELLED) == [], "controls without an accessible name"


LOADED = """ids => ids.every(id => {
  const image = document.getElementById(id);
  return image.complete && image.naturalWidth > 0;
})"""


def test_a_feature_mixing_pair_shows_source_and_target_side_by_side(
    service: Service, alice: httpx.Client, new_page
):
    web = new_page()
    page = web.page
    web.open("alice")
    page.get_by_role("radio", name=re.compile(r"^Feature Mixing")).check()
    # Two prompts instead of images and an instruction.
    expect(page.get_by_label("Instruction", exact=True)).to_be_hidden()
    expect(page.locator("#images-field")).to_be_hidden()
    expect(page.get_by_label("Mixed blocks")).to_have_value("all")
    expect(page.get_by_label("Mixed steps")).to_have_attribute("placeholder", "1 (default)")
    page.get_by_label("Source prompt").fill("A woven straw hat on a wooden table")
    page.get_by_label("Target prompt").fill("A teapot")
    page.get_by_label("Attribute").fill("material")
    page.get_by_label("Mixed blocks").select_option("double")
    web.advanced(steps="2", seed="7")
    assert page.evaluate(UNLABELLED) == [], "controls without an accessible name"

    # Out of range: refused in the page, the field marked, nothing sent.
    mix_steps = page.get_by_label("Mixed steps")
    mix_steps.fill("1.5")
    page.get_by_role("button", name="Run", exact=True).click()
    assert "Mixed steps must be a number from 0 to 1" in web.form_error()
    expect(mix_steps).to_have_attribute("aria-invalid", "true")
    expect(mix_steps).to_be_focused()
    assert not [r for r in web.requests if r.method == "POST"]

    mix_steps.fill("0.5")
    page.get_by_label("Mix strength").fill("0.8")
    page.get_by_label("Target prompt").press("Control+Enter")
    web.status().to_contain_text("Succeeded", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#stages li")).to_have_text(["Encode", "Denoise: step 2 of 2", "Decode"])
    job_id = web.job_id()
    job = get_job(alice, job_id)
    assert (job["task"], job["image_count"], job["seed"]) == ("feature_mixing", 0, 7)
    assert (job["attribute"], job["steps"], len(job["results"])) == ("material", 2, 2)
    mixing = job["mixing"]
    assert (mixing["blocks"], mixing["step_fraction"], mixing["strength"]) == ("double", 0.5, 0.8)
    [posted] = [r for r in web.requests if r.method == "POST"]
    assert 'name="instruction"' not in (posted.post_data or "")

    expect(page.locator("#result-pair figcaption strong")).to_have_text(["Source", "Target"])
    expect(page.locator("#source-caption")).to_contain_text("A woven straw hat on a wooden table")
    expect(page.locator("#target-caption")).to_contain_text("A teapot")
    expect(page.locator("#result-image")).to_be_hidden()
    page.wait_for_function(LOADED, arg=["source-image", "target-image"])
    sizes = page.locator("#result-pair img").evaluate_all("images => images.map(i => i.naturalWidth)")
    assert sizes == [r["width"] for r in job["results"]]
    boxes = [page.locator(f"#{role}-image").bounding_box() for role in ("source", "target")]
    assert boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"], "the pair is not side by side"
    mixed = "the double-stream blocks, 50% of the steps (1 of 2), strength 0.8"
    expect(page.locator("#result-details")).to_contain_text(mixed)

    for index, role in enumerate(("source", "target")):
        with page.expect_download() as download:
            page.get_by_role("link", name=f"Download the {role} image of job {job_id}").click()
        assert download.value.suggested_filename == f"dreamomni2-{job_id}-{role}.png"
        expected = alice.get(f"/v1/jobs/{job_id}/result?index={index}").content
        assert Path(download.value.path()).read_bytes() == expected
    web.screenshot("feature-mixing-result")

    # Back to an ordinary task: the instruction and the images return.
    page.get_by_role("radio", name="Generate a new image").check()
    expect(page.get_by_label("Instruction", exact=True)).to_be_visible()
    expect(page.locator("#mixing-field")).to_be_hidden()


def test_several_images_show_each_with_its_seed_and_download(service: Service, alice: httpx.Client, new_page):
    web = new_page()
    page = web.page
    web.open("alice")
    web.advanced(steps="1", seed="30", images="2")
    expect(page.get_by_label("Images", exact=True)).to_have_attribute("max", "4")
    page.get_by_label("Instruction", exact=True).fill("A red kite over the sea")
    page.get_by_role("button", name="Run", exact=True).click()
    web.status().to_contain_text("Succeeded", timeout=JOB_TIMEOUT_MS)
    job_id = web.job_id()
    job = get_job(alice, job_id)
    assert (job["num_images"], [r["seed"] for r in job["results"]]) == (2, [30, 31])

    expect(page.locator("#result-gallery figcaption strong")).to_have_text(
        ["Image 1 · seed 30", "Image 2 · seed 31"]
    )
    expect(page.locator("#result-image")).to_be_hidden()
    assert page.evaluate(UNLABELLED) == [], "controls without an accessible name"
    for index in range(2):
        with page.expect_download() as download:
            page.get_by_role("link", name=f"Download image {index + 1} of job {job_id}").click()
        assert download.value.suggested_filename == f"dreamomni2-{job_id}-{index}.png"
        expected = alice.get(f"/v1/jobs/{job_id}/result?index={index}").content
        assert Path(download.value.path()).read_bytes() == expected


def test_the_lora_picker_stacks_loras_into_the_job(service: Service, alice: httpx.Client, new_page):
    web = new_page()
    page = web.page
    web.open("alice")
    web.advanced(steps="1")
    name, scale = page.get_by_label("LoRA", exact=True), page.get_by_label("Scale", exact=True)
    expect(name.locator("option")).to_contain_text(
        ["comfy (default scale 1", "kohya (default scale 0.5; edit)"]
    )
    name.select_option("style")
    scale.fill("9")
    scale.press("Enter")  # the keyboard adds; out of range, it is refused as the page refuses the others
    assert "from -4 to 4; got 9" in web.form_error()
    expect(scale).to_be_focused()
    scale.fill("0.25")
    scale.press("Enter")
    name.select_option("comfy")
    page.get_by_role("button", name="Add LoRA").press("Enter")  # its default scale
    expect(page.locator("#lora-chosen li span")).to_have_text(["style at 0.25", "comfy at 1"])
    page.get_by_label("Instruction", exact=True).fill("A red kite over the sea")
    page.get_by_role("button", name="Run", exact=True).click()
    web.status().to_contain_text("Succeeded", timeout=JOB_TIMEOUT_MS)
    assert get_job(alice, web.job_id())["loras"] == [
        {"name": "style", "scale": 0.25}, {"name": "comfy", "scale": 1.0}
    ]  # fmt: skip
