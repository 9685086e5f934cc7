"""The HTTP API (`focalsearch serve`) on the example collection with the bundled demo model."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from conftest import make_image_folder
from focalsearch.cli import app as cli_app
from focalsearch.server.app import create_app
from focalsearch.store import row_id

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "colorshape" / "images"
runner = CliRunner()
LOCAL = "http://127.0.0.1"  # the server answers only to the Host names of its own address (TestClient's default is "testserver")


def attributes(path: str) -> dict[str, str]:
    """colour, shape and background from an example's file name: 00014-blue-triangle-on-black.png."""
    _, color, shape, _, background = Path(path).stem.split("-")
    return {"color": color, "shape": shape, "background": background}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    index = tmp_path_factory.mktemp("served") / "index"
    result = runner.invoke(cli_app, ["index", str(EXAMPLES), "-i", "color", "-i", "shape", "-i", "background",
                                     "--model", "demo", "--index", str(index)])
    assert result.exit_code == 0, result.output
    application = create_app(index, max_upload_bytes=2_000_000)
    with TestClient(application, base_url=LOCAL) as client:
        yield {"client": client, "index": index, "app": application}
    application.state.engine.close()


def post(client, path: str, body) -> httpx.Response:
    return client.post(path, json=body)


def image_id(name: str) -> str:
    return row_id(str((EXAMPLES / name).resolve()))


QUERY = "00014-blue-triangle-on-black.png"


# --- endpoints ---------------------------------------------------------------------------------


def test_health_and_conditions(served):
    client = served["client"]
    assert client.get("/healthz").json()["status"] == "ok"
    listed = client.get("/api/conditions").json()
    assert {c["instruction"]: c["rows"] for c in listed["conditions"]} == {"background": 120, "color": 120, "shape": 120}
    assert all(c["bytes"] > 0 and c["damaged"] is None for c in listed["conditions"])
    assert "/api/search" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "https://" not in docs  # works offline
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_text_search_has_cli_fields_and_links(served):
    out = post(served["client"], "/api/search", {"text": "star", "instruction": "shape", "k": 5}).json()
    assert out["query"] == {"text": "star"} and out["conditions"] == [{"instruction": "shape", "weight": 1.0}]
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    assert all(attributes(r["path"])["shape"] == "star" for r in out["results"])
    hit = out["results"][0]
    assert set(hit) >= {"rank", "score", "scores", "path", "name", "image_id", "thumbnail", "image"}
    assert hit["image_id"] == row_id(hit["path"]) and hit["thumbnail"] == f"/api/thumbnails/{hit['image_id']}?size=256"


def test_image_id_query_excludes_itself_and_pages_with_offset(served):
    client = served["client"]
    whole = post(client, "/api/search", {"image_id": image_id(QUERY), "instruction": "color", "k": 6}).json()["results"]
    assert image_id(QUERY) not in {r["image_id"] for r in whole}
    assert all(attributes(r["path"])["color"] == "blue" for r in whole)
    second = post(client, "/api/search", {"image_id": image_id(QUERY), "instruction": "color", "k": 3, "offset": 3}).json()["results"]
    assert [r["path"] for r in second] == [r["path"] for r in whole[3:]] and [r["rank"] for r in second] == [4, 5, 6]


def test_upload_query_matches_the_image_id_query(served):
    client = served["client"]
    data = (EXAMPLES / QUERY).read_bytes()
    upload = client.post("/api/search", files={"image": (QUERY, data, "image/png")}, data={"instruction": "shape", "k": "4"}).json()
    assert upload["query"] == {"upload": QUERY}
    by_id = post(client, "/api/search", {"image_id": image_id(QUERY), "instruction": "shape", "k": 3}).json()["results"]
    assert upload["results"][0]["image_id"] == image_id(QUERY)  # an upload is not in the index, so it finds itself first
    assert [r["image_id"] for r in upload["results"][1:]] == [r["image_id"] for r in by_id]


def test_compare_gives_one_column_per_instruction(served):
    out = post(served["client"], "/api/compare", {"image_id": image_id(QUERY), "instructions": ["color", "shape"], "k": 5}).json()
    color, shape = out["columns"]
    assert (color["instruction"], shape["instruction"]) == ("color", "shape")
    assert all(attributes(r["path"])["color"] == "blue" for r in color["results"])
    assert all(attributes(r["path"])["shape"] == "triangle" for r in shape["results"])
    assert {r["path"] for r in color["results"]} != {r["path"] for r in shape["results"]}


def test_images_and_cached_thumbnails_by_id_only(served):
    client = served["client"]
    one = image_id(QUERY)
    assert client.get(f"/api/images/{one}").content == (EXAMPLES / QUERY).read_bytes()
    thumb = client.get(f"/api/thumbnails/{one}?size=32")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 32
    cached = served["index"] / "thumbnails" / "32" / f"{one}.jpg"
    made = cached.stat().st_mtime_ns
    assert client.get(f"/api/thumbnails/{one}?size=32").content == thumb.content
    assert cached.stat().st_mtime_ns == made  # made once


# --- several conditions -----------------------------------------------------------------------


def test_shape_and_background_share_both_in_at_least_90_percent_of_top_3(served):
    client = served["client"]
    names = sorted(p.name for p in EXAMPLES.iterdir())
    shared = counted = 0
    for name in names[:20]:
        query = attributes(name)
        matching = [n for n in names if n != name and all(attributes(n)[a] == query[a] for a in ("shape", "background"))]
        if len(matching) < 3:
            continue
        body = {"image_id": image_id(name), "conditions": [{"instruction": "shape", "weight": 1}, {"instruction": "background", "weight": 1}], "k": 3}
        top = post(client, "/api/search", body).json()["results"]
        shared += sum(all(attributes(r["path"])[a] == query[a] for a in ("shape", "background")) for r in top)
        counted += 3
    print(f"shape AND background: {shared}/{counted} of top-3 hits share both")
    assert counted >= 15 and shared / counted >= 0.9


def test_shape_but_not_color_finds_the_shape_in_other_colours(served):
    client = served["client"]
    body = {"image_id": image_id(QUERY), "conditions": [{"instruction": "shape", "weight": 1}, {"instruction": "color", "weight": -1}], "k": 5}
    top = post(client, "/api/search", body).json()["results"]
    assert all(attributes(r["path"])["shape"] == "triangle" and attributes(r["path"])["color"] != "blue" for r in top)
    assert all(set(r["scores"]) == {"shape", "color"} for r in top)
    # Over the whole ranking, NOT colour moves the other blue triangles behind every triangle of another colour.
    def ranked(body):
        return [attributes(r["path"]) for r in post(client, "/api/search", {**body, "k": 200}).json()["results"]]

    def blue_triangle_ranks(ranking):
        return [i for i, a in enumerate(ranking) if a["shape"] == "triangle" and a["color"] == "blue"]

    negated, plain = ranked(body), ranked({"image_id": image_id(QUERY), "instruction": "shape"})
    other_triangles = [i for i, a in enumerate(negated) if a["shape"] == "triangle" and a["color"] != "blue"]
    assert len(blue_triangle_ranks(negated)) >= 2 and min(blue_triangle_ranks(negated)) > max(other_triangles)
    assert sum(blue_triangle_ranks(negated)) > sum(blue_triangle_ranks(plain))


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ({"text": "star", "instruction": "no such thing"}, 404, "not indexed"),
        ({"text": "star", "instruction": "shape", "k": 0}, 422, "k:"),
        ({"text": "star", "instruction": "shape", "k": "many"}, 422, "k:"),
        ({"text": "star", "instruction": "shape", "offset": -1}, 422, "offset"),
        ({"instruction": "shape"}, 400, "give one query"),
        ({"text": "  ", "instruction": "shape"}, 400, "empty text"),
        ({"image_id": "0" * 40, "instruction": "shape"}, 404, "not indexed under"),
        ({"image_id": "../../etc/passwd", "instruction": "shape"}, 404, "not indexed under"),
        ({"text": "star", "conditions": [{"instruction": "shape", "weight": -1}]}, 400, "positive weight"),
        ({"text": "star", "conditions": [{"instruction": "shape"}, {"instruction": "shape"}]}, 400, "only once"),
        ({"text": "star", "instruction": "shape", "surprise": 1}, 422, "surprise"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_bad_search_requests_get_a_4xx_with_one_line(served, body, status, needle):
    response = post(served["client"], "/api/search", body)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and needle in response.json()["error"] and "\n" not in response.json()["error"]


def test_malformed_json_corrupt_and_oversized_uploads(served, tmp_path):
    client = served["client"]
    broken = client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    corrupt = client.post("/api/search", files={"image": ("x.png", b"\x89PNG\r\n\x1a\n not really", "image/png")}, data={"instruction": "shape"})
    assert corrupt.status_code == 400 and "cannot read the uploaded image" in corrupt.json()["error"]
    huge = client.post("/api/search", files={"image": ("big.png", os.urandom(2_500_000), "image/png")}, data={"instruction": "shape"})
    assert huge.status_code == 413 and "limit" in huge.json()["error"]
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")  # a few kB that would decode to 400 megapixels
    served["app"].state.engine.max_pixels = 10_000_000
    try:
        refused = client.post("/api/search", files={"image": ("bomb.png", bomb.getvalue(), "image/png")}, data={"instruction": "shape"})
    finally:
        served["app"].state.engine.max_pixels = 178_956_970
    assert refused.status_code == 400 and "too large" in refused.json()["error"]
    no_file = client.post("/api/search", files={"other": ("x.txt", b"hi", "text/plain")}, data={"instruction": "shape"})
    assert no_file.status_code == 400 and "'image'" in no_file.json()["error"]
    bad_compare = post(client, "/api/compare", {"text": "star", "instructions": ["shape"]})
    assert bad_compare.status_code == 422


@pytest.mark.parametrize("path", ["/api/images/" + "f" * 40, "/api/images/..%2F..%2Fetc%2Fpasswd", "/api/thumbnails/nothex?size=64",
                                  "/api/images/%2Fetc%2Fpasswd"])
def test_nothing_outside_the_index_is_readable(served, path):
    response = served["client"].get(path)
    assert response.status_code == 404 and "root:" not in response.text


def test_thumbnail_size_is_bounded(served):
    assert served["client"].get(f"/api/thumbnails/{image_id(QUERY)}?size=99999").status_code == 422


# --- security ----------------------------------------------------------------------------------


def test_a_token_guards_every_api_request(served):
    application = create_app(served["index"], token="s3cret", engine=served["app"].state.engine)
    with TestClient(application, base_url=LOCAL) as client:
        assert client.get("/api/conditions").status_code == 401
        assert client.get("/api/conditions", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/conditions", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        client.cookies.set("focalsearch_token", "s3cret")
        assert client.get(f"/api/thumbnails/{image_id(QUERY)}").status_code == 200
        assert client.get("/").status_code == 200  # the page itself asks for the token


def test_serve_refuses_a_public_host_without_a_token_and_a_folder_that_is_no_index(tmp_path):
    refused = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0", "--index", str(tmp_path)])
    assert refused.exit_code == 2 and "without a token" in refused.stderr
    missing = runner.invoke(cli_app, ["serve", "--index", str(tmp_path)])
    assert missing.exit_code == 2 and "no index at" in missing.stderr and list(tmp_path.iterdir()) == []


# --- live server: batching and a concurrent indexer ------------------------------------------


def _start_server(index: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "focalsearch.cli", "serve", "--index", str(index), "--port", "0"],
        stderr=subprocess.PIPE, text=True,
    )
    return process, wait_until_serving(process)


def wait_until_serving(process: subprocess.Popen, seconds: float = 120, *, log: Path | None = None) -> str:
    """The URL of a `focalsearch serve --port 0` subprocess once its /healthz answers 200.

    uvicorn picks the port; it is found from the process's listening socket. The server's stderr
    (``log``, or its pipe) is the error when it exits first.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        port = _listening_port(process.pid)
        if port:
            url = f"http://127.0.0.1:{port}"
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
        if process.poll() is not None:
            raise AssertionError(log.read_text() if log else process.stderr.read())
        time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not start" + (": " + log.read_text() if log else ""))


def _listening_port(pid: int) -> int | None:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            return int(fields[1].split(":")[1], 16)
    return None


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="finds the ephemeral port through /proc")
def test_sixteen_clients_while_another_process_indexes(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 60)
    index = tmp_path / "index"
    assert runner.invoke(cli_app, ["index", str(photos), "-i", "color", "--model", str(tiny_focal), "--index", str(index)]).exit_code == 0
    server, url = _start_server(index)
    try:
        make_image_folder(photos, 200, start=60)
        indexer = subprocess.Popen([sys.executable, "-m", "focalsearch.cli", "index", str(photos), "-i", "color", "--index", str(index),
                                    "--commit-every", "0", "--batch-size", "8"], stderr=subprocess.PIPE, text=True)
        failures, seen_rows = [], set()

        def client(number: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                deadline, round_ = time.monotonic() + 240, 0
                while (indexer.poll() is None or round_ < 3) and time.monotonic() < deadline:  # until the indexer is done
                    round_ += 1
                    body = {"text": f"picture {number} {round_}", "instruction": "color", "k": 300}
                    response = http.post("/api/search", json=body)
                    if response.status_code != 200:
                        failures.append(response.text)
                        continue
                    results = response.json()["results"]
                    paths = [r["path"] for r in results]
                    if len(paths) != len(set(paths)) or [r["rank"] for r in results] != list(range(1, len(results) + 1)):
                        failures.append(f"inconsistent list of {len(paths)}")
                    seen_rows.add(len(results))

        clients = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        assert indexer.wait(timeout=300) == 0, indexer.stderr.read()
        assert failures == []
        final = httpx.post(url + "/api/search", json={"text": "x", "instruction": "color", "k": 1000}, timeout=60).json()
        assert len(final["results"]) == 260  # the server picked up the new rows without a restart
        assert max(seen_rows) <= 260 and len(seen_rows) > 1  # queries ran while rows were being added
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_concurrent_queries_share_forward_passes(served):
    engine = served["app"].state.engine
    before_batches, before_encoded = engine._batcher.batches, engine._batcher.encoded
    barrier = threading.Barrier(8)

    def one(n: int) -> None:
        barrier.wait()
        response = post(served["client"], "/api/search", {"text": f"query number {n}", "instruction": "shape", "k": 3})
        assert response.status_code == 200

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    encoded = engine._batcher.encoded - before_encoded
    assert encoded == 8 and engine._batcher.batches - before_batches < 8


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="finds the ephemeral port through /proc")
def test_several_server_processes_share_the_port(served):
    process = subprocess.Popen([sys.executable, "-m", "focalsearch.cli", "serve", "--index", str(served["index"]), "--port", "0",
                                "--workers", "2"], stderr=subprocess.PIPE, text=True)
    try:
        url = wait_until_serving(process)
        answers = [{r["path"]: r["score"] for r in httpx.post(url + "/api/search", json={"text": "star", "instruction": "shape", "k": 5},
                                                              timeout=60).json()["results"]} for _ in range(6)]
        # Every process answers the same, up to float noise: the demo's five nearest stars lie within
        # 0.01 of each other, so two of them may swap places between processes, never change scores.
        first = answers[0]
        for answer in answers[1:]:
            assert sorted(answer.values()) == pytest.approx(sorted(first.values()), abs=1e-3)
            assert all(answer[p] == pytest.approx(first[p], abs=1e-3) for p in answer.keys() & first.keys())
            assert all(min(first.values()) - 1e-3 <= answer[p] for p in answer.keys() - first.keys())
    finally:
        process.terminate()
        process.wait(timeout=30)
