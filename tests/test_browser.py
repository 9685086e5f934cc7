"""The web page of `focalsearch serve`, end to end in a real browser (Chromium driven by Playwright).

A real index is built with the bundled `demo` model on examples/colorshape, the FastAPI app is served
by uvicorn on a loopback port, and the page is used as a person would: type, click, tick, upload.

Needs Debian's `chromium` (or $FOCALSEARCH_CHROMIUM) and the `playwright` package; Playwright's own
browser download is never used. Without them the tests skip, except under CI (CI=true), where a
missing browser fails. Set FOCALSEARCH_SCREENSHOT_DIR to keep the compare view's screenshot
(docs/compare.png and docs/collection.png are made with FOCALSEARCH_SCREENSHOT_DIR=docs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "colorshape"
QUERY_IMAGE = EXAMPLES / "images" / "00014-blue-triangle-on-black.png"
TOKEN = "s3cret-token_42"
K = 12
QUESTION = "what is the main object?"  # an instruction that ends with its own punctuation
COLLECTION_PAGE = 48  # images per page of the collection grid (app.js)
TIMEOUT_MS = 60_000  # a query on 2 busy CPU cores can take a few seconds; never a minute


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _missing(reason: str):
    if _in_ci():
        pytest.fail(f"{reason}; CI needs it (install Debian's chromium: apt-get install -y chromium)")
    pytest.skip(reason)


def _chromium() -> str | None:
    candidates = [os.environ.get("FOCALSEARCH_CHROMIUM"), "/usr/bin/chromium"]
    candidates += [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _attributes(name: str) -> tuple[str, str]:
    """(colour, shape) from a file name like 00014-blue-triangle-on-black.png."""
    _, color, shape, _, _ = Path(name).stem.split("-")
    return color, shape


def _row_id(path: Path) -> str:
    """The image_id the index gives a file (focalsearch.store.row_id of its absolute path)."""
    return hashlib.sha1(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Fixtures: index, servers, browser


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    from focalsearch.cli import app

    index = tmp_path_factory.mktemp("browser") / "colorshape"
    built = CliRunner().invoke(
        app, ["index", str(EXAMPLES), "-i", "color", "-i", "shape", "-i", QUESTION, "--model", "demo", "--index", str(index), "--json"]
    )
    assert built.exit_code == 0, built.output
    return index


class _Server:
    """The app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, index: Path, token: str | None):
        import uvicorn

        from focalsearch.server.app import create_app

        config = uvicorn.Config(
            create_app(index, token=token, device="cpu"), host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        _missing("no chromium browser found")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(browser, index_dir):
    running = _Server(index_dir, token=None)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def token_server(browser, index_dir):
    running = _Server(index_dir, token=TOKEN)
    yield running
    running.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


# ---------------------------------------------------------------------------------------------
# Page helpers


def _open(page, url: str) -> None:
    page.goto(url)
    page.locator('[data-testid="condition"]').first.wait_for()
    page.fill("#k", str(K))


def _tick(page, *instructions: str, negate: tuple[str, ...] = ()) -> None:
    """Tick exactly these instructions (and the `not` box of those in negate)."""
    rows = page.locator('[data-testid="condition"]')
    for i in range(rows.count()):
        row = rows.nth(i)
        instruction = row.get_attribute("data-instruction")
        use = row.locator(".cond-use")
        use.set_checked(instruction in instructions)
        if row.locator(".cond-not").count():
            row.locator(".cond-not").set_checked(instruction in negate)


def _wait_rendered(page, selector: str, *, query: str, key: str, value) -> str:
    """Wait until `selector` shows a finished render of `query` with data-<key> == value; its state."""
    page.wait_for_function(
        """([selector, query, key, value]) => {
            const el = document.querySelector(selector);
            return el && ["done", "empty", "error"].includes(el.dataset.state) && el.dataset.query === query
                && el.dataset[key] !== undefined && JSON.stringify(JSON.parse(el.dataset[key] || "null")) === value;
        }""",
        arg=[selector, query, key, json.dumps(value, separators=(",", ":"))],
    )
    return page.get_attribute(selector, "data-state")


def _wait_results(page, query: str, conditions: list[dict]) -> list[dict]:
    state = _wait_rendered(page, "#results", query=query, key="conditions", value=conditions)
    assert state == "done", (state, page.inner_text("#results-view"), page.inner_text("#error"))
    return _cards(page, "#results")


def _cards(page, scope: str) -> list[dict]:
    return page.eval_on_selector_all(
        f'{scope} [data-testid="result"]',
        """buttons => buttons.map(b => ({
            image_id: b.dataset.imageId, name: b.dataset.name,
            score: b.querySelector('[data-testid="result-score"]').textContent,
            scores: (b.querySelector('[data-testid="result-scores"]') || {}).textContent || null,
            lazy: b.querySelector('img').getAttribute('loading'),
            thumbnail: b.querySelector('img').getAttribute('src'),
        }))""",
    )


def _no_horizontal_overflow(page) -> None:
    widths = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth, document.body.scrollWidth]"
    )
    assert widths[0] <= widths[1] and widths[2] <= widths[1], widths


def _images_loaded(page, scope: str) -> bool:
    """Whether the thumbnails in `scope` that the browser loaded decoded as real images."""
    return page.eval_on_selector_all(
        f"{scope} img", "imgs => imgs.filter(i => i.complete).length > 0 && imgs.filter(i => i.complete).every(i => i.naturalWidth > 0)"
    )


def _watch(page) -> list[str]:
    """What goes wrong while the page loads: console errors, failed requests, answers >= 400."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on("response", lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
    return problems


def _screenshot_dir(tmp_path: Path) -> Path:
    shot_dir = Path(os.environ.get("FOCALSEARCH_SCREENSHOT_DIR") or tmp_path)
    shot_dir.mkdir(parents=True, exist_ok=True)
    return shot_dir


def _save_small_png(png: bytes, path: Path) -> None:
    """A screenshot as a 256-colour PNG: the page is flat colours, so this keeps it small and sharp."""
    import io

    from PIL import Image

    Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256).save(path, optimize=True)


# ---------------------------------------------------------------------------------------------
# Tests


def test_search_more_like_this_instruction_switch_compare_and_phone_width(page, server, tmp_path):
    _open(page, server.url)
    assert page.title() == "FocalSearch"
    assert page.locator('[data-testid="condition"]').evaluate_all("rows => rows.map(r => r.dataset.instruction)") == [
        "color",
        "shape",
        QUESTION,
    ]

    # A text query, submitted with Enter.
    _tick(page, "shape")
    page.fill("#query-text", "star")
    page.press("#query-text", "Enter")
    shape = [{"instruction": "shape", "weight": 1}]
    stars = _wait_results(page, "text:star", shape)
    assert len(stars) == K
    assert all(card["lazy"] == "lazy" and card["thumbnail"].startswith("/api/thumbnails/") for card in stars)
    assert sum(_attributes(card["name"])[1] == "star" for card in stars) >= K // 2, [c["name"] for c in stars]
    assert "star" in page.inner_text("#status")
    page.wait_for_function("() => [...document.querySelectorAll('#results img')].some(i => i.complete && i.naturalWidth > 0)")
    assert _images_loaded(page, "#results")

    # More like this: clicking a result searches by its image_id under the same instruction.
    clicked = stars[0]
    page.click(f'#results [data-testid="result"][data-image-id="{clicked["image_id"]}"]')
    similar = _wait_results(page, f"image:{clicked['image_id']}", shape)
    assert [c["image_id"] for c in similar] != [c["image_id"] for c in stars]
    assert page.get_attribute("#query-summary", "data-image-id") == clicked["image_id"]
    assert clicked["name"] in page.inner_text("#query-summary")

    # An uploaded image (multipart) under "color", then the same image from its result, under shape and colour.
    _tick(page, "color")
    page.set_input_files("#query-file", str(QUERY_IMAGE))
    color = [{"instruction": "color", "weight": 1}]
    uploaded = _wait_results(page, f"file:{QUERY_IMAGE.name}", color)
    assert uploaded[0]["name"] == QUERY_IMAGE.name  # the uploaded picture finds itself first
    query_id = _row_id(QUERY_IMAGE)
    assert uploaded[0]["image_id"] == query_id

    page.focus(f'#results [data-testid="result"][data-image-id="{query_id}"]')
    page.keyboard.press("Enter")  # results are real buttons: the keyboard works too
    by_color = _wait_results(page, f"image:{query_id}", color)
    _tick(page, "shape")
    by_shape = _wait_results(page, f"image:{query_id}", shape)
    assert [c["image_id"] for c in by_color] != [c["image_id"] for c in by_shape]
    assert sum(_attributes(c["name"])[0] == "blue" for c in by_color) >= K * 3 // 4, [c["name"] for c in by_color]
    assert sum(_attributes(c["name"])[1] == "triangle" for c in by_shape) >= K * 3 // 4, [c["name"] for c in by_shape]
    assert query_id not in {c["image_id"] for c in by_color + by_shape}  # "more like this" leaves the query out

    # Compare: the same image under colour and shape, side by side.
    _tick(page, "color", "shape")
    page.click("#mode-compare")
    assert page.get_attribute("#mode-compare", "aria-pressed") == "true"
    state = _wait_rendered(page, "#compare", query=f"image:{query_id}", key="instructions", value=["color", "shape"])
    assert state == "done", page.inner_text("#compare-view")
    assert page.is_hidden("#results-view") and page.is_visible("#compare-view")
    columns = page.locator('#compare [data-testid="compare-column"]')
    assert columns.evaluate_all("cs => cs.map(c => c.dataset.instruction)") == ["color", "shape"]
    color_column = _cards(page, '#compare [data-testid="compare-column"][data-instruction="color"]')
    shape_column = _cards(page, '#compare [data-testid="compare-column"][data-instruction="shape"]')
    assert len(color_column) == len(shape_column) == K
    assert [c["image_id"] for c in color_column] != [c["image_id"] for c in shape_column]
    assert [c["image_id"] for c in color_column] == [c["image_id"] for c in by_color]
    assert [c["image_id"] for c in shape_column] == [c["image_id"] for c in by_shape]
    side_by_side = columns.evaluate_all("cs => cs.map(c => c.getBoundingClientRect().top)")
    assert side_by_side[0] == side_by_side[1]
    page.wait_for_function("() => [...document.querySelectorAll('#compare img')].every(i => i.complete)")
    assert _images_loaded(page, "#compare")

    shot = _screenshot_dir(tmp_path) / "compare.png"
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    _save_small_png(page.screenshot(full_page=True), shot)
    assert 0 < shot.stat().st_size < 400_000

    # At phone width nothing overflows sideways and the columns stack.
    page.set_viewport_size({"width": 390, "height": 844})
    _no_horizontal_overflow(page)
    stacked = columns.evaluate_all("cs => cs.map(c => c.getBoundingClientRect())")
    assert stacked[1]["top"] >= stacked[0]["bottom"]

    # Clicking a result in a compare column compares that image.
    other = shape_column[1]
    page.click(f'#compare [data-testid="compare-column"][data-instruction="shape"] [data-image-id="{other["image_id"]}"]')
    state = _wait_rendered(page, "#compare", query=f"image:{other['image_id']}", key="instructions", value=["color", "shape"])
    assert state == "done"
    assert page.get_attribute("#query-summary", "data-image-id") == other["image_id"]
    _no_horizontal_overflow(page)

    # Back to the results at phone width: both conditions' scores are shown on each result.
    page.click("#mode-search")
    both = [{"instruction": "color", "weight": 1}, {"instruction": "shape", "weight": 1}]
    fused = _wait_results(page, f"image:{other['image_id']}", both)
    assert all(card["scores"] and "color" in card["scores"] and "shape" in card["scores"] for card in fused)
    _no_horizontal_overflow(page)
    # The browser's Back button returns to the previous query, in the view it was shown in.
    page.go_back()
    state = _wait_rendered(page, "#compare", query=f"image:{query_id}", key="instructions", value=["color", "shape"])
    assert state == "done" and page.is_visible("#compare-view")


def test_same_shape_but_not_the_same_colour(page, server):
    _open(page, server.url)
    _tick(page, "shape", "color", negate=("color",))
    page.set_input_files("#query-file", str(QUERY_IMAGE))
    wanted = [{"instruction": "color", "weight": -1}, {"instruction": "shape", "weight": 1}]
    cards = _wait_results(page, f"file:{QUERY_IMAGE.name}", wanted)
    attributes = [_attributes(c["name"]) for c in cards]
    assert sum(shape == "triangle" for _, shape in attributes) >= K * 3 // 4, attributes
    assert sum(color != "blue" for color, _ in attributes) >= K * 3 // 4, attributes
    assert all("not color" in c["scores"] and "shape" in c["scores"] for c in cards)


def test_api_errors_and_empty_results_are_shown_in_the_page(page, server):
    _open(page, server.url)
    # Only a NOT condition: the server refuses the query (a 4xx with {"error"}), and the page says why.
    _tick(page, "color", negate=("color",))
    page.fill("#query-text", "star")
    page.press("#query-text", "Enter")
    state = _wait_rendered(page, "#results", query="text:star", key="conditions", value=[{"instruction": "color", "weight": -1}])
    assert state == "error"
    banner = page.locator('[data-testid="error-banner"]')
    assert banner.is_visible()
    assert "positive weight" in banner.inner_text()
    assert page.get_attribute('[data-testid="error-banner"]', "role") == "alert"
    assert "positive weight" in page.inner_text("#results-message")
    assert page.locator('#results [data-testid="result"]').count() == 0

    # Fixing the condition reruns the query, and the error goes away.
    _tick(page, "color")
    assert len(_wait_results(page, "text:star", [{"instruction": "color", "weight": 1}])) == K
    assert banner.is_hidden()

    # A file that is not an image: the server's decode error is shown.
    page.set_input_files("#query-file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a picture"}])
    state = _wait_rendered(page, "#results", query="file:notes.png", key="conditions", value=[{"instruction": "color", "weight": 1}])
    assert state == "error"
    assert banner.is_visible() and banner.inner_text().strip()
    assert page.locator('#results [data-testid="result"]').count() == 0

    # Compare with a single instruction ticked asks for more, without calling the server.
    page.click("#mode-compare")
    page.wait_for_function("() => document.querySelector('#compare').dataset.state === 'empty'")
    assert "2 to 4" in page.inner_text("#compare-message")

    # An empty answer says so (the server never answers empty for this index: fake one answer).
    page.click("#mode-search")
    page.route(
        "**/api/search",
        lambda route: route.fulfill(
            status=200,
            content_type="application/json",
            body=json.dumps({"query": {}, "conditions": [{"instruction": "color", "weight": 1}], "results": []}),
        ),
    )
    page.fill("#query-text", "nothing")
    page.press("#query-text", "Enter")
    state = _wait_rendered(page, "#results", query="text:nothing", key="conditions", value=[{"instruction": "color", "weight": 1}])
    assert state == "empty"
    assert "No results" in page.inner_text("#results-message")
    assert page.is_hidden('[data-testid="error-banner"]')


def test_token_is_asked_for_in_the_page_and_then_used(page, token_server):
    page.goto(token_server.url)
    form = page.locator('[data-testid="token-form"]')
    form.wait_for(state="visible")
    page.fill("#token-input", "wrong-token")
    page.press("#token-input", "Enter")
    page.wait_for_function("() => document.querySelector('#token-message').textContent.includes('not accepted')")
    assert form.is_visible()

    page.fill("#token-input", TOKEN)
    page.click("#token-submit")
    page.locator('[data-testid="condition"]').first.wait_for()
    assert form.is_hidden()
    cookie = next(c for c in page.context.cookies() if c["name"] == "focalsearch_token")
    assert cookie["value"] == TOKEN and cookie["path"] == "/" and cookie["sameSite"] == "Strict"

    page.fill("#k", str(K))
    _tick(page, "shape")
    page.fill("#query-text", "star")
    page.press("#query-text", "Enter")
    cards = _wait_results(page, "text:star", [{"instruction": "shape", "weight": 1}])
    assert len(cards) == K
    # The thumbnails load too: <img> requests carry the token in the cookie.
    page.wait_for_function("() => [...document.querySelectorAll('#results img')].some(i => i.complete && i.naturalWidth > 0)")
    assert _images_loaded(page, "#results")

    # A page opened later in the same browser needs no token again.
    second = page.context.new_page()
    second.goto(token_server.url)
    second.locator('[data-testid="condition"]').first.wait_for()
    assert second.locator('[data-testid="token-form"]').is_hidden()


def test_damaged_conditions_are_shown_as_unavailable(page, server):
    def conditions(route):
        listed = route.fetch().json()
        listed["conditions"][1]["damaged"] = "table files missing; run focalsearch check --repair"
        route.fulfill(status=200, content_type="application/json", body=json.dumps(listed))

    page.route("**/api/conditions", conditions)
    _open(page, server.url)
    damaged = page.locator('[data-testid="condition"][data-instruction="shape"]')
    assert damaged.get_attribute("data-damaged") == "true"
    assert damaged.locator(".cond-use").is_disabled()
    assert "unavailable: table files missing" in damaged.inner_text()
    assert page.locator('[data-testid="condition"][data-instruction="color"] .cond-use').is_checked()


def _wait_collection(page, offset: int) -> list[dict]:
    """Wait for the collection grid to show the page starting at `offset`; its images."""
    page.wait_for_function(
        "offset => { const el = document.querySelector('#collection');"
        " return el.dataset.state === 'done' && el.dataset.offset === String(offset); }",
        arg=offset,
    )
    return page.eval_on_selector_all(
        '#collection [data-testid="collection-image"]',
        "buttons => buttons.map(b => ({image_id: b.dataset.imageId, name: b.dataset.name,"
        " thumbnail: b.querySelector('img').getAttribute('src')}))",
    )


def test_the_page_opens_on_the_collection_and_a_click_finds_more_like_it(page, server, tmp_path):
    problems = _watch(page)
    files = sorted((EXAMPLES / "images").glob("*.png"))
    names = [f.name for f in files]
    page.goto(server.url)
    first = _wait_collection(page, 0)
    assert page.is_visible("#collection-view") and page.is_hidden("#results-view") and page.is_hidden("#compare-view")
    assert [c["name"] for c in first] == names[:COLLECTION_PAGE]  # sorted by path, a page at a time
    assert all(c["thumbnail"] == f"/api/thumbnails/{c['image_id']}?size=256" for c in first)
    assert page.inner_text("#collection-page") == f"1–{COLLECTION_PAGE} of {len(files)} images"
    assert page.is_disabled("#collection-prev") and page.is_enabled("#collection-next")
    page.wait_for_function("() => [...document.querySelectorAll('#collection img')].some(i => i.complete && i.naturalWidth > 0)")
    assert _images_loaded(page, "#collection")
    page.wait_for_function(  # the thumbnails in view, for the screenshot
        "() => [...document.querySelectorAll('#collection img')].filter(i => i.getBoundingClientRect().top < innerHeight)"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    _save_small_png(page.screenshot(), _screenshot_dir(tmp_path) / "collection.png")

    # Paging: every indexed image once, in path order, and Next stops at the end.
    shown = list(first)
    offset = 0
    while page.is_enabled("#collection-next"):
        page.click("#collection-next")
        offset += COLLECTION_PAGE
        shown += _wait_collection(page, offset)
    assert offset == (len(files) - 1) // COLLECTION_PAGE * COLLECTION_PAGE
    assert [c["name"] for c in shown] == names
    assert [c["image_id"] for c in shown] == [_row_id(f) for f in files]
    last_page = shown[offset:]
    assert page.is_enabled("#collection-prev")

    # A click on a listed image is "more like this" under the ticked instruction, with no file to hand.
    _tick(page, "shape")
    clicked = next(c for c in last_page if _attributes(c["name"])[1] == "star")
    page.click(f'#collection [data-image-id="{clicked["image_id"]}"]')
    shape = [{"instruction": "shape", "weight": 1}]
    similar = _wait_results(page, f"image:{clicked['image_id']}", shape)
    assert page.is_hidden("#collection-view") and page.is_visible("#results-view")
    assert page.get_attribute("#query-summary", "data-image-id") == clicked["image_id"]
    assert clicked["image_id"] not in {c["image_id"] for c in similar}
    assert sum(_attributes(c["name"])[1] == "star" for c in similar) >= K * 3 // 4, [c["name"] for c in similar]
    assert page.inner_text("#status").endswith("under shape.")

    # An instruction that ends with "?" gets no second full stop.
    _tick(page, QUESTION)
    _wait_results(page, f"image:{clicked['image_id']}", [{"instruction": QUESTION, "weight": 1}])
    status = page.inner_text("#status")
    assert status.endswith(f"under {QUESTION}") and not status.endswith("?."), status

    # Back returns to the collection, on the page the click came from; the button browses it too.
    page.go_back()
    assert _wait_collection(page, offset) == last_page
    assert page.is_visible("#collection-view") and page.is_hidden("#results-view")
    page.click(f'#collection [data-image-id="{last_page[0]["image_id"]}"]')
    _wait_results(page, f"image:{last_page[0]['image_id']}", [{"instruction": QUESTION, "weight": 1}])
    page.click("#browse")
    assert _wait_collection(page, offset) == last_page
    assert page.is_hidden("#browse")

    # The listing API, against the same server: a bad limit is a 422 with one line, past the end is empty.
    listed = page.request.get(f"{server.url}/api/images?offset=2&limit=3").json()
    assert listed["total"] == len(files) and [i["name"] for i in listed["images"]] == names[2:5]
    assert page.request.get(f"{server.url}/api/images?offset={len(files)}").json()["images"] == []
    refused = page.request.get(f"{server.url}/api/images?limit=0")
    assert refused.status == 422 and "limit" in refused.json()["error"]

    # The favicon the page names exists, and so does /favicon.ico.
    icon = page.get_attribute('link[rel="icon"]', "href")
    for url in (f"{server.url}{icon}", f"{server.url}/favicon.ico"):
        answer = page.request.get(url)
        assert answer.status == 200 and answer.headers["content-type"].startswith("image/"), url
    assert not problems, problems


def test_docs_renders_the_api(page, server):
    problems = _watch(page)
    page.goto(f"{server.url}/docs")
    # Swagger UI 4 showed only "Unable to render this definition" (a version pragma) for OpenAPI 3.1.
    page.wait_for_selector(".opblock, .version-pragma, .errors-wrapper")
    for failure in (".version-pragma", ".errors-wrapper"):
        assert page.locator(failure).count() == 0, page.inner_text(failure)
    search = page.locator(".opblock", has=page.locator('.opblock-summary-path[data-path="/api/search"]'))
    search.wait_for()
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)")
    assert {"/api/search", "/api/compare", "/api/conditions", "/api/images"} <= set(paths), paths
    # Expanded, the operation shows its request body's schema.
    search.locator(".opblock-summary").first.click()
    body = search.locator(".opblock-body")
    body.wait_for()
    page.wait_for_function("() => document.querySelector('.opblock-body').innerText.includes('Request body')")
    assert "application/json" in body.inner_text()
    assert not problems, problems
