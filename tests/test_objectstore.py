"""Images in object storage: an S3-compatible server (moto) on loopback, no AWS account involved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import make_image_folder
from focalsearch import objectstore
from focalsearch.cli import app
from focalsearch.store import row_id

runner = CliRunner()
BUCKET = "photos-bucket"


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint": f"http://{host}:{port}", "allow_http": "true", "access_key_id": "test", "secret_access_key": "test",
               "region": "us-east-1"}
    filesystem = fs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="test", secret_key="test",
                                 region="us-east-1", allow_bucket_creation=True)
    filesystem.create_dir(BUCKET)
    yield {"fs": filesystem, "options": options, "flags": [arg for k, v in options.items() for arg in ("--storage-option", f"{k}={v}")]}
    objectstore.configure({})
    server.stop()


def upload(s3, local: list[Path], root: Path, prefix: str) -> list[str]:
    uris = []
    for path in local:
        key = f"{BUCKET}/{prefix}/{path.relative_to(root).as_posix()}"
        with s3["fs"].open_output_stream(key) as out:
            out.write(path.read_bytes())
        uris.append(f"s3://{key}")
    return uris


def cli_json(*args: object) -> dict:
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_index_query_and_update_images_in_a_bucket(s3, tmp_path, tiny_focal):
    local = tmp_path / "local"
    uris = upload(s3, make_image_folder(local, 30), local, "photos")
    with s3["fs"].open_output_stream(f"{BUCKET}/photos/.hidden/x.png") as out:
        out.write(b"not scanned")
    index = tmp_path / "index"
    first = cli_json("index", f"s3://{BUCKET}/photos", "-i", "color", "--model", tiny_focal, "--index", index, *s3["flags"])
    assert (first["encoded"], first["conditions"], first["skipped"]) == (30, {"color": 30}, [])

    hits = cli_json("query", "--text", "red", "-i", "color", "-k", "5", "--index", index)["results"]
    assert all(h["path"].startswith(f"s3://{BUCKET}/photos/") and h["image_id"] == row_id(h["path"]) for h in hits)
    by_image = cli_json("query", uris[0], "-i", "color", "-k", "5", "--index", index, *s3["flags"])["results"]
    assert len(by_image) == 5 and uris[0] not in {h["path"] for h in by_image}  # the query object itself is left out

    added = upload(s3, make_image_folder(local, 20, start=30), local, "photos")
    for uri in uris[:10]:
        s3["fs"].delete_file(uri[len("s3://"):])
    second = cli_json("index", f"s3://{BUCKET}/photos", "-i", "color", "--index", index, *s3["flags"])
    assert (second["encoded"], second["removed"], second["unchanged"], second["conditions"]) == (20, 10, 20, {"color": 40})
    again = cli_json("index", f"s3://{BUCKET}/photos", "-i", "color", "--index", index, *s3["flags"])
    assert (again["encoded"], again["unchanged"]) == (0, 40)

    # The server reads indexed objects through the object store, by row id only.
    from focalsearch.server.app import create_app

    application = create_app(index)
    with TestClient(application, base_url="http://127.0.0.1") as client:  # a Host the server answers to
        assert client.get(f"/api/images/{row_id(added[0])}").content == (local / Path(added[0]).relative_to(f"s3:/{BUCKET}/photos")).read_bytes()
        assert client.get(f"/api/thumbnails/{row_id(added[0])}?size=32").headers["content-type"] == "image/jpeg"
        assert client.get(f"/api/images/{row_id(uris[0])}").status_code == 404  # deleted, and no longer indexed
    application.state.engine.close()


def test_bad_storage_options_and_missing_prefixes_are_one_line(s3, tmp_path, tiny_focal):
    bad = runner.invoke(app, ["index", f"s3://{BUCKET}/photos", "--model", str(tiny_focal), "--index", str(tmp_path / "i"),
                              "--storage-option", "endpoint"])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --storage-option takes KEY=VALUE, not 'endpoint'"
    missing = runner.invoke(app, ["index", f"s3://{BUCKET}/nothing-here", "--model", str(tiny_focal), "--index", str(tmp_path / "i"),
                                  *s3["flags"]])
    assert missing.exit_code == 2 and "path not found: s3://photos-bucket/nothing-here" in missing.stderr
    assert not (tmp_path / "i").exists()


def test_an_index_in_the_bucket_with_faiss_files_beside_its_tables(s3, tmp_path, tiny_focal, monkeypatch):
    monkeypatch.setenv("FOCALSEARCH_CACHE", str(tmp_path / "cache-a"))
    local = tmp_path / "local"
    uris = upload(s3, make_image_folder(local, 30), local, "shots")
    index = f"s3://{BUCKET}/index"
    first = cli_json("index", f"s3://{BUCKET}/shots", "-i", "color", "--model", tiny_focal, "--index", index, *s3["flags"])
    assert first["conditions"] == {"color": 30}
    faiss_objects = [uri for uri, _, _ in objectstore.list_objects(f"{index}/faiss")]
    assert any(u.endswith(".faiss") for u in faiss_objects) and any(u.endswith(".paths.arrow") for u in faiss_objects)

    # Another machine (another cache) queries the bucket's index: it fetches the FAISS files of this table version.
    monkeypatch.setenv("FOCALSEARCH_CACHE", str(tmp_path / "cache-b"))
    hits = cli_json("query", "--text", "red", "-i", "color", "-k", "5", "--index", index, *s3["flags"])["results"]
    assert len(hits) == 5 and all(h["path"].startswith(f"s3://{BUCKET}/shots/") for h in hits)
    assert list((tmp_path / "cache-b").rglob("*.faiss"))
    listed = cli_json("conditions", "--index", index, *s3["flags"])
    assert listed["index"] == index and listed["conditions"][0]["rows"] == 30

    upload(s3, make_image_folder(local, 20, start=30), local, "shots")
    for uri in uris[:10]:
        s3["fs"].delete_file(uri[len("s3://"):])
    second = cli_json("index", f"s3://{BUCKET}/shots", "-i", "color", "--index", index, *s3["flags"])
    assert (second["encoded"], second["removed"], second["unchanged"], second["conditions"]) == (20, 10, 20, {"color": 40})
    report = cli_json("check", "--index", index, *s3["flags"])
    assert report["ok"] and report["conditions"][0]["rows"] == 40
    missing = runner.invoke(app, ["conditions", "--index", f"s3://{BUCKET}/no-index", *s3["flags"]])
    assert missing.exit_code == 2 and "no index at s3://photos-bucket/no-index" in missing.stderr


def test_the_ray_engine_reads_images_from_the_bucket_and_writes_the_index_there(s3, tmp_path, tiny_focal):
    local = tmp_path / "local"
    upload(s3, make_image_folder(local, 24), local, "ray-photos")
    index = f"s3://{BUCKET}/ray-index"
    report = cli_json("index", f"s3://{BUCKET}/ray-photos", "-i", "color", "--model", tiny_focal, "--index", index,
                      "--engine", "ray", *s3["flags"])
    assert (report["encoded"], report["skipped"], report["conditions"]) == (24, [], {"color": 24})
    assert cli_json("check", "--index", index, *s3["flags"])["ok"]
    hits = cli_json("query", "--text", "red", "-i", "color", "-k", "3", "--index", index, *s3["flags"])["results"]
    assert len(hits) == 3 and all(h["path"].startswith(f"s3://{BUCKET}/ray-photos/") for h in hits)
    local_engine = cli_json("index", f"s3://{BUCKET}/ray-photos", "-i", "color", "--model", tiny_focal, "--index",
                            tmp_path / "index-local", *s3["flags"])
    assert local_engine["conditions"] == report["conditions"]


def test_a_large_conditions_on_disk_index_travels_through_the_bucket(s3, tmp_path, monkeypatch):
    import numpy as np

    from focalsearch import ann, search
    from focalsearch.store import FileRecord, Store

    objectstore.configure(s3["options"])
    monkeypatch.setenv("FOCALSEARCH_CACHE", str(tmp_path / "cache-a"))
    monkeypatch.setattr(search, "STREAM_BLOCK_ROWS", 500)
    uri = f"s3://{BUCKET}/large-index"
    store = Store(uri, create=True)
    condition = store.ensure_condition("color", "m", "focallens", 16)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.add(condition, [FileRecord(row_id(f"/img/{i}.jpg"), f"/img/{i}.jpg", 1, 1, "h", 1, 1) for i in range(3000)], vectors)
    built = search.load_condition_index(store, condition, exact_max_rows=1000)
    assert built.ann.kind == "ivf" and built.ann.data_file is not None

    def in_bucket() -> set[str]:
        return {u.rsplit("/", 1)[1] for u, _, _ in objectstore.list_objects(f"{uri}/faiss")}

    assert built.ann.data_file.name in in_bucket()

    # Another machine fetches the lists file with the index instead of building its own.
    monkeypatch.setenv("FOCALSEARCH_CACHE", str(tmp_path / "cache-b"))
    build = ann.build_ivf_on_disk
    monkeypatch.setattr(ann, "build_ivf_on_disk", lambda *a, **k: pytest.fail("the bucket's index must be used"))
    other = Store(uri)
    fetched = search.load_condition_index(other, other.find("color"), exact_max_rows=1000)
    assert fetched.ann.data_file.name == built.ann.data_file.name and fetched.ann.data_file.parent != built.ann.data_file.parent
    queries = vectors[:20]
    np.testing.assert_array_equal(ann.search(fetched.ann, queries, 5)[1], ann.search(built.ann, queries, 5)[1])

    # A change rebuilds it there; the bucket then holds the new lists file only.
    monkeypatch.setattr(ann, "build_ivf_on_disk", build)
    other.delete(other.find("color"), [row_id("/img/0.jpg")])
    rebuilt = search.load_condition_index(other, other.find("color"), exact_max_rows=1000)
    assert rebuilt.ann.ntotal == 2999 and rebuilt.ann.data_file.name != built.ann.data_file.name
    lists_files = {name for name in in_bucket() if name.endswith(".ivfdata")}
    assert lists_files == {rebuilt.ann.data_file.name}
    assert not list(rebuilt.ann.data_file.parent.glob("*.ivfdata.*"))
