"""Issue 23, items 1, 4 and 5 against live `focalsearch serve` processes: other web sites cannot reach the
server (Host, Origin, content type), bad bodies are 4xx, and the API speaks API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from conftest import make_image_folder
from focalsearch import errors
from focalsearch.api import FocalSearch
from focalsearch.cli import app as cli_app
from focalsearch.server.security import HostPolicy
from test_server import wait_until_serving

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="finds the ephemeral port through /proc")
runner = CliRunner()
TOKEN = "s3cret-token"
EVIL = "rebind.evil.example"


class Live:
    """`focalsearch serve ... --port 0` as a subprocess, its log in a file."""

    def __init__(self, index: Path, log: Path, *args: str):
        self.log = log
        with open(log, "w") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "focalsearch.cli", "serve", "--index", str(index), "--port", "0", *args],
                                            stderr=stderr, text=True)
        self.url = wait_until_serving(self.process, 180, log=log)
        self.port = int(self.url.rsplit(":", 1)[1])

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=60, **kwargs)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("security")
    make_image_folder(root / "photos", 12)
    built = runner.invoke(cli_app, ["index", str(root / "photos"), "-i", "shape", "-i", "color", "--model", "demo",
                                    "--index", str(root / "index")])
    assert built.exit_code == 0, built.output
    return root / "index"


@pytest.fixture(scope="module")
def server(index, tmp_path_factory):
    live = Live(index, tmp_path_factory.mktemp("log") / "serve.log")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def some_id(server) -> str:
    return server.request("POST", "/api/search", json={"text": "red", "instruction": "shape", "k": 1}).json()["results"][0]["image_id"]


def every_route(server, some_id) -> list[tuple[str, str]]:
    """(method, path) of every route: the API's from its own OpenAPI, and the page, docs and static files."""
    spec = server.request("GET", "/openapi.json").json()
    routes = [(method.upper(), path.replace("{image_id}", some_id)) for path, item in spec["paths"].items() for method in item]
    assert ("POST", "/api/search") in routes and ("GET", f"/api/images/{some_id}") in routes
    return routes + [("GET", p) for p in ("/", "/docs", "/docs-assets/swagger-ui.css", "/openapi.json", "/healthz", "/static/app.js")]


SEARCH = {"text": "red", "instruction": "shape", "k": 2}


def send(server, method: str, path: str, headers: dict | None = None) -> httpx.Response:
    body = {"json": SEARCH if path != "/api/compare" else {"text": "red", "instructions": ["shape", "color"]}} if method == "POST" else {}
    return server.request(method, path, headers=headers or {}, **body)


# --- 1. other web sites -------------------------------------------------------------------------


def test_a_rebinding_host_gets_403_on_every_route(server, some_id):
    routes = every_route(server, some_id)
    for method, path in routes:
        assert send(server, method, path).status_code == 200, (method, path)  # the same request under its own Host works
        for host in (f"{EVIL}:{server.port}", EVIL, f"localhost.evil.example:{server.port}", f"127.0.0.1.nip.io:{server.port}", ""):
            refused = send(server, method, path, {"Host": host})
            assert refused.status_code == 403, (method, path, host, refused.text)
            assert "does not answer to the host" in refused.json()["error"]
    for host in (f"localhost:{server.port}", "LOCALHOST", f"127.0.0.1:{server.port}", f"[::1]:{server.port}", "127.0.0.2"):
        assert send(server, "GET", "/api/conditions", {"Host": host}).status_code == 200, host


def test_a_cross_site_origin_gets_403(server, some_id):
    own = f"http://127.0.0.1:{server.port}"
    assert send(server, "POST", "/api/search", {"Origin": own}).status_code == 200  # the page's own fetches
    assert send(server, "POST", "/api/search", {"Origin": f"http://localhost:{server.port}", "Host": f"localhost:{server.port}"}).status_code == 200
    for origin in ("http://evil.example", "null", f"http://localhost:{server.port + 1 if server.port < 65535 else 1}",
                   f"https://127.0.0.1:{server.port}", f"http://{EVIL}:{server.port}", f"http://localhost:{server.port}"):
        for method, path in (("POST", "/api/search"), ("POST", "/api/compare"), ("GET", "/api/conditions"), ("GET", f"/api/images/{some_id}")):
            refused = send(server, method, path, {"Origin": origin})
            assert refused.status_code == 403 and "cross-site request refused" in refused.json()["error"], (origin, method, path)
    # Without an Origin (an <img> on another site), the browser's Sec-Fetch-Site tells.
    assert send(server, "GET", f"/api/thumbnails/{some_id}", {"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert send(server, "GET", f"/api/thumbnails/{some_id}", {"Sec-Fetch-Site": "same-origin"}).status_code == 200
    # A link from another site still opens the page.
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert send(server, "GET", "/", link).status_code == 200
    assert send(server, "GET", "/", {**link, "Sec-Fetch-Dest": "iframe"}).status_code == 403


def test_json_must_be_sent_as_application_json(server):
    body = json.dumps(SEARCH).encode()
    for kind in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "application/jsonp", None):
        headers = {"content-type": kind} if kind else {}
        refused = server.request("POST", "/api/search", content=body, headers=headers)
        assert refused.status_code == 415, (kind, refused.text)
        assert "application/json" in refused.json()["error"] and "\n" not in refused.json()["error"]
    for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert server.request("POST", "/api/search", content=body, headers={"content-type": kind}).status_code == 200, kind


def test_healthz_without_the_token_says_only_that_it_is_up(server):
    assert server.request("GET", "/healthz").json() == {"status": "ok"}


def test_allowed_host_admits_a_name_and_a_token_holder_sees_the_counters(index, tmp_path):
    live = Live(index, tmp_path / "serve.log", "--allowed-host", "mybox.example", "--token", TOKEN, "--workers", "2")
    try:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        named = {**bearer, "Host": f"mybox.example:{live.port}", "Origin": f"http://mybox.example:{live.port}"}
        assert live.request("POST", "/api/search", json=SEARCH, headers=named).status_code == 200
        assert live.request("GET", "/", headers={"Host": "MyBox.Example"}).status_code == 200
        assert live.request("GET", "/", headers={"Host": "otherbox.example"}).status_code == 403
        assert live.request("GET", "/healthz", headers={"Host": f"{EVIL}:{live.port}", **bearer}).status_code == 403  # the token is no pass
        assert live.request("GET", "/healthz").json() == {"status": "ok"}
        full = live.request("GET", "/healthz", headers=bearer).json()
        assert full["index"] == str(index) and {"queries_encoded", "forward_passes"} <= set(full)
    finally:
        live.stop()


def test_allowed_host_values_are_checked(index):
    star = runner.invoke(cli_app, ["serve", "--index", str(index), "--allowed-host", "*"])
    assert star.exit_code == 2 and "needs a token" in star.stderr and len(star.stderr.strip().splitlines()) == 1
    for bad in ("http://mybox.example", "mybox.example:8000", "my box", ""):
        refused = runner.invoke(cli_app, ["serve", "--index", str(index), "--allowed-host", bad])
        assert refused.exit_code == 2 and "--allowed-host takes a bare name" in refused.stderr, (bad, refused.output)


def test_host_policy_of_a_server_bound_to_every_address():
    every = HostPolicy("0.0.0.0", ["mybox.example"])
    assert every.allows("192.168.1.5") and every.allows("mybox.example") and every.allows("localhost")
    assert not every.allows("rebind.evil.example")
    loopback = HostPolicy("127.0.0.1")
    assert loopback.allows("::1") and loopback.allows("::ffff:127.0.0.1") and not loopback.allows("192.168.1.5")
    assert HostPolicy("127.0.0.1", ["*"]).allows("rebind.evil.example")


# --- 4. bad bodies are 4xx, always --------------------------------------------------------------


def test_deeply_nested_and_overlong_bodies_are_400_without_a_traceback(server):
    nested = b"[" * 100_000 + b"]" * 100_000  # 200 KB
    for body in (nested, b'{"text": "red", "instruction": "shape", "conditions": ' + nested + b"}"):
        response = server.request("POST", "/api/search", content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, response.text
        assert set(response.json()) == {"error"} and "\n" not in response.json()["error"]
    deep = server.request("POST", "/api/search", content=nested, headers={"content-type": "application/json"})
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
    moderately = b'{"text": "red", "conditions": ' + b"[" * 200 + b"]" * 200 + b"}"  # parses, but deeper than any query needs
    assert server.request("POST", "/api/search", content=moderately, headers={"content-type": "application/json"}).status_code == 400
    form = server.request("POST", "/api/search", files={"image": ("a.png", b"x", "image/png")},
                          data={"conditions": "[" * 100_000 + "]" * 100_000})
    assert form.status_code == 400 and "nested too deeply" in form.json()["error"]
    long_number = b'{"text": "red", "instruction": "shape", "k": ' + b"1" * 5000 + b"}"  # past int()'s digit limit: a ValueError
    too_long = server.request("POST", "/api/search", content=long_number, headers={"content-type": "application/json"})
    assert too_long.status_code == 400 and "number too long" in too_long.json()["error"]
    assert server.request("GET", "/healthz").status_code == 200  # still up
    log = server.log.read_text()
    assert "Traceback" not in log and "RecursionError" not in log, log[-2000:]


# --- 5. the API speaks API ------------------------------------------------------------------------


def test_a_search_without_an_instruction_is_400_naming_the_indexed_ones(server):
    response = server.request("POST", "/api/search", json={"text": "red"})
    assert response.status_code == 400
    message = response.json()["error"]
    assert '"shape"' in message and '"color"' in message and "--" not in message


def test_errors_name_no_cli_flags(server, index):
    for body in ({"text": "  ", "instruction": "shape"}, {"instruction": "shape"}, {"text": "red"}):
        message = server.request("POST", "/api/search", json=body).json()["error"]
        assert "--" not in message and "-k" not in message, message
    engine = FocalSearch(index)
    for call, needle in ((lambda: engine.search(text="red", instruction="shape", k=0), "k must be at least 1"),
                         (lambda: engine.search(text=" ", instruction="shape"), "empty text query"),
                         (lambda: engine.search(instruction="shape"), "give one query")):
        with pytest.raises(errors.UserError) as caught:
            call()
        assert needle in str(caught.value) and "--" not in str(caught.value) and "-k" not in str(caught.value)


def test_a_query_is_one_of_text_image_id_or_upload_in_json_and_multipart(server, some_id, index):
    png = next((index.parent / "photos").rglob("*.png")).read_bytes()
    both_json = server.request("POST", "/api/search", json={**SEARCH, "image_id": some_id})
    both_form = server.request("POST", "/api/search", files={"image": ("a.png", png, "image/png")}, data={"text": "red", "instruction": "shape"})
    both_ids = server.request("POST", "/api/compare", files={"image": ("a.png", png, "image/png")},
                              data={"image_id": some_id, "instructions": '["shape", "color"]'})
    for response in (both_json, both_form, both_ids):
        assert response.status_code == 400 and "give one query" in response.json()["error"], response.text
    typo = server.request("POST", "/api/search", files={"image": ("a.png", png, "image/png")}, data={"instrution": "shape"})
    assert typo.status_code == 422 and "instrution" in typo.json()["error"]
    alone = server.request("POST", "/api/search", files={"image": ("a.png", png, "image/png")}, data={"instruction": "shape"})
    assert alone.status_code == 200 and alone.json()["query"] == {"upload": "a.png"}


def test_library_hits_have_the_name_of_the_json_results(server, index):
    hits = FocalSearch(index).search(text="red", instruction="shape", k=3)
    served = server.request("POST", "/api/search", json={"text": "red", "instruction": "shape", "k": 3}).json()["results"]
    assert [h.name for h in hits.results] == [Path(h.path).name for h in hits.results] == [r["name"] for r in served]
    assert hits.to_dict()["results"][0]["name"] == hits.results[0].name
