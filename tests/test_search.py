"""The query engine's derived FAISS indexes, and storage failures seen through the API."""

from __future__ import annotations

import errno
import fcntl

import numpy as np
import pytest

from conftest import make_image_folder
from focalsearch.api import FocalSearch
from focalsearch.errors import DamagedIndexError, IndexBusyError, StorageError
from focalsearch.search import faiss_files, build_condition_index, load_condition_index, search_index
from focalsearch.store import FileRecord, Store, row_id


def _random_store(tmp_path, n: int, dim: int = 16) -> tuple[Store, object, np.ndarray]:
    store = Store(tmp_path / "index", create=True)
    condition = store.ensure_condition("color", "m", "focallens", dim)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, dim))
    vectors = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    records = [FileRecord(row_id(f"/img/{i}.jpg"), f"/img/{i}.jpg", 1, 1, "h", 1, 1) for i in range(n)]
    for start in range(0, n, 2000):
        store.upsert(condition, records[start:start + 2000], vectors[start:start + 2000])
    return store, condition, vectors


def test_faiss_index_is_reused_until_the_table_changes(tmp_path):
    store, condition, vectors = _random_store(tmp_path, 50)
    built = load_condition_index(store, condition)
    index_file, _ = faiss_files(store, condition)
    stamp = index_file.stat().st_mtime_ns
    assert load_condition_index(store, condition).table_version == built.table_version
    assert index_file.stat().st_mtime_ns == stamp, "a fresh index must not be rebuilt"

    store.delete(condition, [row_id("/img/0.jpg")])
    rebuilt = load_condition_index(store, condition)
    assert rebuilt.ann.ntotal == 49 and "/img/0.jpg" not in rebuilt.paths.to_pylist()
    hits = search_index(rebuilt, vectors[0], 5)
    assert "/img/0.jpg" not in [h.path for h in hits]


def test_broken_faiss_files_are_rebuilt_not_trusted(tmp_path):
    store, condition, vectors = _random_store(tmp_path, 40)
    load_condition_index(store, condition)
    index_file, paths_file = faiss_files(store, condition)
    index_file.write_bytes(index_file.read_bytes()[:50])
    assert search_index(load_condition_index(store, condition), vectors[3], 1)[0].path == "/img/3.jpg"
    paths_file.write_bytes(b"garbage")
    assert search_index(load_condition_index(store, condition), vectors[7], 1)[0].path == "/img/7.jpg"


def test_large_tables_get_an_approximate_index_with_checked_recall(tmp_path):
    store, condition, vectors = _random_store(tmp_path, 6000)
    index = build_condition_index(store, condition, exact_max_rows=1000)
    assert index.ann.kind in ("hnsw", "ivf") and index.ann.recall_at_10 >= 0.95
    exact = load_condition_index(store, condition, exact_max_rows=10**9)
    assert exact.ann.kind != "flat"  # the persisted approximate index is fresh and reused
    found = sum(
        len({h.path for h in search_index(index, q, 10)} & {p for p, _ in store.exact_search(condition, q, 10)})
        for q in vectors[:50]
    )
    assert found / 500 >= 0.9


def test_full_disk_is_one_clear_storage_error(tmp_path, tiny_focal, monkeypatch):
    photos = tmp_path / "photos"
    make_image_folder(photos, 6)
    engine = FocalSearch(tmp_path / "index", model=str(tiny_focal), batch_size=2)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lancedb.table.LanceTable.merge_insert", no_space)
    monkeypatch.setattr("lancedb.table.LanceTable.add", no_space)
    with pytest.raises(StorageError, match="no space left.*committed rows are kept"):
        engine.index([photos], ["color"])


def _count_commits(monkeypatch) -> list[int]:
    rows_per_commit: list[int] = []
    for name in ("add", "upsert"):
        real = getattr(Store, name)

        def counting(self, condition, records, vectors, _real=real):
            rows_per_commit.append(len(records))
            return _real(self, condition, records, vectors)

        monkeypatch.setattr(Store, name, counting)
    return rows_per_commit


def test_rows_are_committed_by_time_not_by_batch(tmp_path, tiny_focal, monkeypatch):
    photos = tmp_path / "photos"
    make_image_folder(photos, 12)
    commits = _count_commits(monkeypatch)
    FocalSearch(tmp_path / "every", model=str(tiny_focal), batch_size=4, commit_seconds=0).index([photos], ["color"])
    assert commits == [4, 4, 4]
    commits.clear()
    report = FocalSearch(tmp_path / "timed", model=str(tiny_focal), batch_size=4, commit_seconds=3600).index([photos], ["color"])
    assert commits == [4, 8] and report.conditions == {"color": 12}  # the first batch at once, the rest at the end


def test_an_interrupt_commits_what_was_already_encoded(tmp_path, tiny_focal, monkeypatch):
    from focalsearch.models.clip_family import ClipFamilyEncoder

    photos = tmp_path / "photos"
    make_image_folder(photos, 12)
    real_encode, calls = ClipFamilyEncoder.encode_batch, []

    def interrupted_on_third_batch(self, pixels, instructions, **options):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(self, pixels, instructions, **options)

    monkeypatch.setattr(ClipFamilyEncoder, "encode_batch", interrupted_on_third_batch)
    engine = FocalSearch(tmp_path / "index", model=str(tiny_focal), batch_size=4, commit_seconds=3600)
    with pytest.raises(KeyboardInterrupt):
        engine.index([photos], ["color"])
    assert engine.conditions()[0].rows == 8

    monkeypatch.setattr(ClipFamilyEncoder, "encode_batch", real_encode)
    report = engine.index([photos], ["color"])
    assert (report.encoded, report.unchanged, report.conditions) == (4, 8, {"color": 12})


def test_a_failed_commit_never_adds_a_row_twice(tmp_path, tiny_focal, monkeypatch):
    photos = tmp_path / "photos"
    originals = make_image_folder(photos, 6)
    engine = FocalSearch(tmp_path / "index", model=str(tiny_focal), batch_size=4, commit_seconds=3600)
    engine.index([photos], ["color"])
    for path in originals[:2]:  # changed files are replaced by id, new ones appended
        path.write_bytes(path.read_bytes() + b"\0")
    make_image_folder(photos, 2, start=6)

    def broken_upsert(*args, **kwargs):
        raise RuntimeError("lance failed")

    monkeypatch.setattr(Store, "upsert", broken_upsert)
    with pytest.raises(RuntimeError, match="lance failed"):
        engine.index([photos], ["color"])
    store = Store(tmp_path / "index")
    paths = store.snapshot(store.find("color"))[1].to_pylist()
    assert len(paths) == len(set(paths)) == 8

    monkeypatch.undo()
    report = FocalSearch(tmp_path / "index", batch_size=4).index([photos], ["color"])
    assert (report.encoded, report.conditions) == (2, {"color": 8})


def test_concurrent_writers_are_refused(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 2)
    engine = FocalSearch(tmp_path / "index", model=str(tiny_focal))
    engine.index([photos])
    with open(tmp_path / "index" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(IndexBusyError):
            FocalSearch(tmp_path / "index").index([photos])


def test_each_image_is_decoded_once_for_several_instructions(tmp_path, tiny_focal, monkeypatch):
    import focalsearch.indexer as indexer

    photos = tmp_path / "photos"
    make_image_folder(photos, 9)
    loads = []
    real_load = indexer.load_image
    monkeypatch.setattr(indexer, "load_image", lambda stat, **kw: loads.append(stat.path) or real_load(stat, **kw))
    report = FocalSearch(tmp_path / "index", model=str(tiny_focal), batch_size=4).index([photos], ["color", "shape", "quantity"])
    assert report.conditions == {"color": 9, "shape": 9, "quantity": 9}
    assert sorted(loads) == sorted(p.resolve() for p in photos.rglob("*.*"))


def test_indexing_decodes_jpegs_at_the_size_the_model_needs(tmp_path, tiny_focal, monkeypatch):
    import focalsearch.indexer as indexer

    photos = tmp_path / "photos"
    make_image_folder(photos, 6, size=(400, 300))
    sizes = []
    real_load = indexer.load_image

    def spy(stat, **kw):
        loaded = real_load(stat, **kw)
        sizes.append((stat.path.suffix, kw.get("min_side"), loaded.image.size, (loaded.width, loaded.height)))
        return loaded

    monkeypatch.setattr(indexer, "load_image", spy)
    FocalSearch(tmp_path / "index", model=str(tiny_focal)).index([photos], ["color"])
    side = 32  # the tiny model's input
    assert {s[1] for s in sizes} == {side}
    for suffix, _, decoded, full in sizes:
        assert full == (400, 300)
        # JPEG: 1/8 scale (50x38) keeps both sides >= 32; other formats decode whole.
        assert decoded == ((50, 38) if suffix == ".jpg" else (400, 300))


def test_a_rerun_with_nothing_to_encode_does_not_load_the_model(tmp_path, tiny_focal, monkeypatch):
    photos = tmp_path / "photos"
    make_image_folder(photos, 5)
    (photos / "broken.jpg").write_bytes(b"")
    FocalSearch(tmp_path / "index", model=str(tiny_focal)).index([photos], ["color"])

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("focalsearch.models.clip_family.ClipFamilyEncoder.__init__", no_model)
    report = FocalSearch(tmp_path / "index").index([photos], ["color"])
    assert (report.encoded, report.unchanged, len(report.skipped)) == (0, 5, 1)


def test_a_query_loads_only_the_towers_it_needs(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    paths = make_image_folder(photos, 6)
    FocalSearch(tmp_path / "index", model=str(tiny_focal)).index([photos], ["color", ""])
    full = FocalSearch(tmp_path / "index")
    full.search(image=paths[1], instruction="color", k=1)
    assert set(full._encoders) == {"both"}
    engine = FocalSearch(tmp_path / "index")
    by_text = engine.search(text="a red circle", instruction="color", k=3)
    assert set(engine._encoders) == {"text"}
    assert by_text.results == full.search(text="a red circle", instruction="color", k=3).results
    plain = engine.search(image=paths[0], instruction="", k=3)
    assert set(engine._encoders) == {"text", "vision"}
    assert plain.results == full.search(image=paths[0], instruction="", k=3).results
    conditioned = engine.search(image=paths[0], instruction="color", k=3)
    assert set(engine._encoders) == {"text", "vision", "both"}
    assert conditioned.results == full.search(image=paths[0], instruction="color", k=3).results
    engine.search(text="blue", instruction="color", k=3)
    assert len(engine._encoders) == 3  # once both towers are loaded, nothing else is


def _vectors_by_path(index_dir, instruction: str) -> dict[str, np.ndarray]:
    store = Store(index_dir)
    _, paths, vectors = store.snapshot(store.find(instruction))
    return dict(zip(paths.to_pylist(), vectors))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_indexing_on_cuda_matches_the_cpu(tmp_path, tiny_focal):
    # The CUDA path: pinned pixels copied once per batch and shared by the conditions, bf16 weights.
    photos = tmp_path / "photos"
    make_image_folder(photos, 10)
    for device, precision in (("cpu", "float32"), ("cuda", "auto")):
        FocalSearch(tmp_path / ("gpu" if device == "cuda" else device), model=str(tiny_focal), device=device, precision=precision, batch_size=4).index(
            [photos], ["color", "shape"]
        )
    for instruction in ("color", "shape"):
        cpu, gpu = _vectors_by_path(tmp_path / "cpu", instruction), _vectors_by_path(tmp_path / "gpu", instruction)
        assert cpu.keys() == gpu.keys() and len(cpu) == 10
        assert min(float(cpu[p] @ gpu[p]) for p in cpu) > 0.99


def test_a_large_condition_is_indexed_from_a_stream_of_its_table(tmp_path, monkeypatch):
    from focalsearch import search

    monkeypatch.setattr(search, "STREAM_BLOCK_ROWS", 700)  # several blocks
    store, condition, vectors = _random_store(tmp_path, 5000)
    index = build_condition_index(store, condition, exact_max_rows=1000)
    assert index.ann.kind == "ivf" and index.ann.data_file is not None and index.ann.data_file.is_file()
    for i in (0, 1234, 4999):  # positions stand for the right rows
        assert search_index(index, vectors[i], 1)[0].path == f"/img/{i}.jpg"
    reloaded = load_condition_index(store, condition, exact_max_rows=1000)
    assert reloaded.ann.data_file == index.ann.data_file


def test_where_the_folder_cannot_be_written_a_large_index_is_built_in_memory(tmp_path, monkeypatch):
    from focalsearch import ann

    store, condition, vectors = _random_store(tmp_path, 3000)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ann, "build_ivf_on_disk", no_space)
    index = build_condition_index(store, condition, exact_max_rows=1000)
    assert index.ann.kind == "ivf" and index.ann.data_file is None
    assert search_index(index, vectors[42], 1)[0].path == "/img/42.jpg"


def test_a_table_that_changes_during_a_streamed_build_is_built_again_at_its_new_version(tmp_path, monkeypatch):
    from focalsearch import ann

    store, condition, vectors = _random_store(tmp_path, 3000)
    build = ann.build_ivf_on_disk
    calls = []

    def changing_underneath(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # an indexer commits, then the version being read is cleaned up
            store.delete(condition, [row_id("/img/0.jpg")])
            raise DamagedIndexError('condition "color" is damaged (LanceError(IO): Not found: data/....lance)')
        return build(*args, **kwargs)

    monkeypatch.setattr(ann, "build_ivf_on_disk", changing_underneath)
    index = build_condition_index(store, condition, exact_max_rows=1000)
    assert len(calls) == 2 and index.ann.ntotal == 2999 and index.table_version == store.version(condition)
    assert "/img/0.jpg" not in index.paths.to_pylist()
