"""Failures a real user meets: full disks, read-only and damaged indexes, folders that are not an
index, unreadable folders, huge query images, and small mistakes on the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import lancedb
import pytest
from typer.testing import CliRunner

from conftest import draw_image, make_image_folder
from focalsearch.cli import app
from hardening_helpers import (
    can_mount_tmpfs,
    fill_disk,
    focalsearch_command,
    resize_tmpfs,
    run_unprivileged,
    shared_dir,
    small_tmpfs,
    start_in_terminal,
    unprivileged_prefix,
    wait_for_output,
)

runner = CliRunner()
NO_SPACE = "lance error: LanceError(IO): No space left on device (os error 28)"
TWELVE = [arg for i in range(12) for arg in ("-i", f"instruction number {i}")]


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, *needles: str) -> str:
    output = result.stderr if hasattr(result, "stderr") else ""
    exit_code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert exit_code == code, (exit_code, result.stdout, output)
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output and "internal error" not in output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(focalsearch_command(*args), capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def check_json(index: Path) -> dict:
    result = cli("check", "--index", index, "--json")
    return json.loads(result.stdout)


def table_folder(index: Path, instruction: str) -> Path:
    conditions = json.loads(cli("conditions", "--index", index, "--json").stdout)["conditions"]
    table = next(c["table"] for c in conditions if c["instruction"] == instruction)
    return index / "lancedb" / f"{table}.lance"


@pytest.fixture()
def indexed(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 24)
    index = tmp_path / "index"
    result = cli("index", photos, "-i", "color", "-i", "shape", "--model", tiny_focal, "--index", index, "--json")
    assert result.exit_code == 0, result.output
    return {"photos": photos, "index": index, "model": tiny_focal}


# --- 1, 2: a full disk ------------------------------------------------------------------------


@pytest.mark.skipif(not can_mount_tmpfs(), reason="mounting a tmpfs needs root; the injected-fault tests below cover this")
def test_a_full_disk_while_indexing_is_one_line_and_a_rerun_completes(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 300)
    with small_tmpfs("2m") as mount:
        index = mount / "idx"
        full = run("index", photos, *TWELVE, "--model", tiny_focal, "--index", index, "--commit-every", "0", "--batch-size", "16")
        one_line_error(full, 2, "no space left", "committed rows are kept")
        resize_tmpfs(mount, "64m")
        rerun = run("index", photos, *TWELVE, "--index", index, "--json")
        assert rerun.returncode == 0, rerun.stderr
        assert set(json.loads(rerun.stdout)["conditions"].values()) == {300}
        report = check_json(index)
        assert report["ok"] and len(report["conditions"]) == 12
        assert all(c["rows"] == 300 and c["status"] == "ok" for c in report["conditions"])  # deep read: no id twice


@pytest.mark.skipif(not can_mount_tmpfs(), reason="mounting a tmpfs needs root; test_failed_faiss_save_costs_only_a_rebuild covers this")
def test_a_query_on_a_full_disk_still_answers(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 30)
    with small_tmpfs("8m") as mount:
        index = mount / "idx"
        assert run("index", photos, "-i", "color", "--model", tiny_focal, "--index", index).returncode == 0
        shutil.rmtree(index / "faiss")
        fill_disk(mount)
        result = run("query", "--text", "red", "-i", "color", "--index", index, "--json")
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["results"]) == 10
        assert not list((index / "faiss").glob("*.tmp")) if (index / "faiss").exists() else True


def _raise_no_space(*args, **kwargs):
    raise RuntimeError(NO_SPACE)


@pytest.mark.parametrize("method", ["add", "optimize", "merge_insert"])
def test_injected_no_space_in_any_lancedb_write_is_one_line_exit_2(tmp_path, tiny_focal, monkeypatch, method):
    """The same failure at the table append, the compaction and the catalog write (merge_insert)."""
    photos = tmp_path / "photos"
    make_image_folder(photos, 12)
    monkeypatch.setattr(lancedb.table.LanceTable, method, _raise_no_space)
    result = cli("index", photos, "-i", "color", "--model", tiny_focal, "--index", tmp_path / "index")
    one_line_error(result, 2, "no space left", "committed rows are kept")


def test_failed_faiss_save_costs_only_a_rebuild(indexed, monkeypatch):
    import faiss

    shutil.rmtree(indexed["index"] / "faiss")
    monkeypatch.setattr(faiss, "write_index", _raise_no_space)
    result = cli("query", "--text", "red", "-i", "color", "--index", indexed["index"], "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["results"]) == 10
    assert not list((indexed["index"] / "faiss").glob("*.faiss"))


@pytest.mark.skipif(not can_mount_tmpfs(), reason="mounting a tmpfs needs root")
def test_a_rerun_that_encodes_nothing_cleans_up_after_a_full_disk(tmp_path, tiny_focal):
    """The disk fills while the run compacts, after every row is committed: the rerun has nothing
    to encode, and must still delete the failed run's old versions and unused files."""
    from focalsearch.store import Store

    photos = tmp_path / "photos"
    make_image_folder(photos, 1000)
    three = ["-i", "color", "-i", "shape", "-i", "background"]
    with small_tmpfs("64m") as mount:
        index = mount / "idx"
        assert run("index", photos, *three, "--model", tiny_focal, "--index", index).returncode == 0
        make_image_folder(photos, 16, start=1000)
        # Room for the 16 new rows' commits (a few pages per table), not for compacting a table of 1,016 rows (~300 KB).
        filler = fill_disk(mount, leave=160_000)
        one_line_error(run("index", photos, *three, "--index", index), 2, "no space left", "committed rows are kept")
        store = Store(index)
        assert {store.count(c) for c in store.conditions()} == {1016}
        assert any(store.untidy(c) for c in store.conditions())  # what the failed run left
        # A rerun on the still-full disk has nothing to encode: it succeeds, and deletes what it can
        # without writing (old versions, unused files), which frees space, instead of failing.
        still_full = run("index", photos, *three, "--index", index, "--json")
        assert still_full.returncode == 0, still_full.stderr
        report = json.loads(still_full.stdout)
        assert report["encoded"] == 0 and "disk is full" in " ".join(report["notes"])  # the merge was skipped
        store = Store(index)
        assert all(len(store._table(c).list_versions()) == 1 for c in store.conditions())
        assert {store.count(c) for c in store.conditions()} == {1016}
        assert any(store.untidy(c) for c in store.conditions())  # unmerged: the next run with space merges
        filler.unlink()

        rerun = run("index", photos, *three, "--index", index, "--json")
        assert rerun.returncode == 0, rerun.stderr
        report = json.loads(rerun.stdout)
        assert report["encoded"] == 0 and report["unchanged"] == 1016
        store = Store(index)
        assert not any(store.untidy(c) for c in store.conditions())
        for c in store.conditions():
            assert len(store._table(c).list_versions()) == 1
        sizes = {c["instruction"]: c["bytes"] for c in json.loads(cli("conditions", "--index", index, "--json").stdout)["conditions"]}
        assert check_json(index)["ok"]

    reference = tmp_path / "reference"  # the same rows indexed in one clean run
    assert run("index", photos, *three, "--model", tiny_focal, "--index", reference).returncode == 0
    clean = {c["instruction"]: c["bytes"] for c in json.loads(cli("conditions", "--index", reference, "--json").stdout)["conditions"]}
    for instruction, size in sizes.items():
        assert abs(size - clean[instruction]) <= 0.02 * clean[instruction], (sizes, clean)


# --- 3: a read-only index --------------------------------------------------------------------


@pytest.fixture()
def workspace(tiny_focal):
    """A folder that user nobody can enter, holding a copy of the tiny model; removed afterwards."""
    base = shared_dir("focalsearch-unprivileged-")
    shutil.copytree(tiny_focal, base / "model")
    yield base
    subprocess.run(["chmod", "-R", "u+rwx", str(base)])
    shutil.rmtree(base, ignore_errors=True)


def test_a_read_only_index_refuses_indexing_and_answers_queries_without_root(workspace):
    """Runs as user nobody (or root without capabilities), since root ignores file modes."""
    base, model = workspace, workspace / "model"
    photos = base / "photos"
    make_image_folder(photos, 20)
    index = base / "index"
    assert run("index", photos, "-i", "color", "--model", model, "--index", index).returncode == 0
    shutil.rmtree(index / "faiss")  # the query must rebuild it in memory
    for path in [base, *base.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222 | 0o555 if path.is_dir() else path.stat().st_mode & ~0o222 | 0o444)
    _, who = unprivileged_prefix()
    indexing = run_unprivileged(focalsearch_command("index", photos, "-i", "color", "--index", index), home=base)
    one_line_error(indexing, 2, f"index {index} is read-only")
    query = run_unprivileged(focalsearch_command("query", "--text", "red", "-i", "color", "--index", index, "--json"), home=base)
    assert query.returncode == 0, (who, query.stderr)
    assert len(json.loads(query.stdout)["results"]) == 10
    listing = run_unprivileged(focalsearch_command("conditions", "--index", index, "--json"), home=base)
    assert listing.returncode == 0 and json.loads(listing.stdout)["conditions"][0]["rows"] == 20, listing.stderr
    assert not (index / "faiss").exists()  # nothing was written
    print(f"ran as {who}")


def test_a_new_index_in_an_unwritable_folder_names_that_folder_without_root(workspace):
    base, model = workspace, workspace / "model"
    photos = base / "photos"
    make_image_folder(photos, 4)
    for path in [base, *base.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    locked = base / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for index in (locked / "index", locked / "new" / "index"):
        result = run_unprivileged(focalsearch_command("index", photos, "--model", model, "--index", index), home=base)
        line = one_line_error(result, 2, f"cannot create index {index}", f"folder {locked} cannot be written", "Permission denied")
        assert "read-only" not in line
    assert list(locked.iterdir()) == []


def test_an_unreadable_file_is_skipped_as_permission_denied_without_root(tmp_path):
    base = shared_dir("focalsearch-unreadable-")
    try:
        picture = base / "secret.png"
        draw_image(1).save(picture)
        picture.chmod(0)
        probe = "from focalsearch.images import load_image; import sys; print(load_image(sys.argv[1]).reason)"
        result = run_unprivileged([os.sys.executable, "-c", probe, str(picture)], home=base)
        assert result.stdout.strip() == "permission denied", result.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- 4: a damaged index -----------------------------------------------------------------------


def _truncate_data(index: Path, instruction: str) -> None:
    for data in (table_folder(index, instruction) / "data").iterdir():
        with open(data, "r+b") as f:
            f.truncate(max(1, data.stat().st_size // 3))


@pytest.mark.parametrize("damage", ["truncated data file", "deleted _versions"])
def test_a_damaged_condition_is_reported_refused_and_repaired(indexed, damage):
    index, photos = indexed["index"], indexed["photos"]
    if damage == "truncated data file":
        _truncate_data(index, "color")
    else:
        shutil.rmtree(table_folder(index, "color") / "_versions")

    listing = cli("conditions", "--index", index, "--json")
    assert listing.exit_code == 0, listing.output
    by_instruction = {c["instruction"]: c for c in json.loads(listing.stdout)["conditions"]}
    assert by_instruction["color"]["damaged"] and by_instruction["shape"]["damaged"] is None
    assert by_instruction["shape"]["rows"] == 24

    # The FAISS file is still there and its table version unchanged: the query must not serve it.
    one_line_error(cli("query", "--text", "red", "-i", "color", "--index", index), 2,
                   'condition "color" is damaged', "focalsearch check --repair")
    assert cli("query", "--text", "red", "-i", "shape", "--index", index).exit_code == 0
    one_line_error(cli("index", photos, "-i", "color", "--index", index), 2, 'condition "color" is damaged')

    found = cli("check", "--index", index)
    one_line_error(found, 2, "1 problem(s) left", "check --repair")
    assert "damaged" in found.stdout

    repaired = cli("check", "--index", index, "--repair", "--json")
    assert repaired.exit_code == 0, repaired.output
    statuses = {c["instruction"]: c["status"] for c in json.loads(repaired.stdout)["conditions"]}
    assert statuses == {"color": "repaired", "shape": "ok"}
    report = check_json(index)
    assert report["ok"] and {c["instruction"]: c["rows"] for c in report["conditions"]} == {"color": 24, "shape": 24}
    assert all(c["faiss"] == "fresh" for c in report["conditions"])
    hits = json.loads(cli("query", "--text", "red", "-i", "color", "--index", index, "--json", "-k", "30").stdout)["results"]
    assert len(hits) == 24 and len({h["path"] for h in hits}) == 24  # exact rows, none twice


def test_a_lost_catalog_is_rebuilt_from_the_tables(indexed):
    index = indexed["index"]
    shutil.rmtree(index / "lancedb" / "conditions.lance")
    one_line_error(cli("conditions", "--index", index), 2, "catalog", "check --repair")
    repaired = cli("check", "--index", index, "--repair", "--json")
    assert repaired.exit_code == 0, repaired.output
    assert json.loads(repaired.stdout)["catalog"] == "rebuilt"
    rows = {c["instruction"]: c["rows"] for c in json.loads(cli("conditions", "--index", index, "--json").stdout)["conditions"]}
    assert rows == {"color": 24, "shape": 24}
    # The rebuilt catalog still knows the model and source folders: a rerun encodes nothing.
    rerun = json.loads(cli("index", indexed["photos"], "-i", "color", "-i", "shape", "--index", index, "--json").stdout)
    assert rerun["encoded"] == 0 and rerun["unchanged"] == 24


def test_check_of_a_healthy_index_changes_nothing(indexed):
    index = indexed["index"]
    before = sorted((p.relative_to(index), p.stat().st_mtime_ns) for p in index.rglob("*") if p.is_file())
    result = cli("check", "--index", index)
    assert result.exit_code == 0, result.output
    assert result.stdout.count(" ok ") == 2
    after = sorted((p.relative_to(index), p.stat().st_mtime_ns) for p in index.rglob("*") if p.is_file())
    assert before == after


# --- 5: folders that are not an index ---------------------------------------------------------


@pytest.mark.parametrize("command", [("conditions",), ("query", "--text", "red"), ("check",), ("check", "--repair")])
def test_read_commands_on_a_folder_that_is_no_index_create_nothing(tmp_path, command):
    folder = tmp_path / "some" / "dir"
    folder.mkdir(parents=True)
    one_line_error(cli(*command, "--index", folder), 2, f"no index at {folder}")
    assert list(folder.iterdir()) == []
    one_line_error(cli(*command, "--index", tmp_path / "missing"), 2, "no index at")
    assert not (tmp_path / "missing").exists()


def test_a_failed_first_index_leaves_no_folder_behind(tmp_path, photos):
    index = tmp_path / "new-index"
    result = cli("index", photos, "--model", tmp_path / "no-such-model", "--index", index)
    one_line_error(result, 2, "no-such-model")
    assert not index.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert cli("index", photos, "--model", tmp_path / "no-such-model", "--index", existing).exit_code == 2
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]


# --- 6: nothing skipped goes unreported -------------------------------------------------------


def test_symlink_loops_and_broken_links_are_listed_as_skipped(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 6)
    (photos / "set0" / "up").symlink_to(photos)
    (photos / "self.png").symlink_to(photos / "self.png")
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    report = json.loads(cli("index", photos, "--model", tiny_focal, "--index", tmp_path / "i", "--json").stdout)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert reasons["up"].startswith("symlink loop") and reasons["self.png"] == "symlink loop"
    assert reasons["gone.jpg"].startswith("broken symlink")
    assert report["encoded"] == 6


def test_an_unreadable_folder_is_listed_as_skipped_without_root(workspace):
    base, model = workspace, workspace / "model"
    photos = base / "photos"
    make_image_folder(photos, 6)
    locked = photos / "private"
    make_image_folder(locked, 2)
    locked.chmod(0)
    for path in [base, *base.rglob("*")]:
        if path != locked and not path.is_relative_to(locked):
            path.chmod(0o777 if path.is_dir() else 0o666)
    result = run_unprivileged(focalsearch_command("index", photos, "--model", model, "--index", base / "i", "--json"), home=base)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["encoded"] == 6
    assert {(s["path"], s["reason"]) for s in report["skipped"]} == {(str(locked), "unreadable folder: Permission denied")}


# --- 7: query images ---------------------------------------------------------------------------


def test_a_large_query_jpeg_is_decoded_at_reduced_size(indexed, tmp_path, monkeypatch):
    import focalsearch.api as api

    big = tmp_path / "big.jpg"
    draw_image(5, (64, 64)).resize((4096, 3072)).save(big, quality=80)
    decoded = []
    original = api.open_query_image

    def spy(*args, **kwargs):
        loaded = original(*args, **kwargs)
        decoded.append((loaded.image.size, loaded.width, loaded.height))
        return loaded

    monkeypatch.setattr(api, "open_query_image", spy)
    result = cli("query", big, "-i", "color", "--index", indexed["index"], "--json")
    assert result.exit_code == 0, result.output
    (size, width, height), = decoded
    assert (width, height) == (4096, 3072)
    assert size[0] <= 4096 // 8 and size[1] <= 3072 // 8  # DCT-scaled, as when indexing


# --- 9: old versions ----------------------------------------------------------------------------


def test_a_finished_index_keeps_one_version_and_reports_its_bytes(tmp_path, tiny_focal):
    photos = tmp_path / "photos"
    make_image_folder(photos, 40)
    index = tmp_path / "index"
    for start in (40, 60):  # a second run adds 20 images in many small commits
        assert cli("index", photos, "-i", "color", "--model", tiny_focal, "--index", index, "--commit-every", "0",
                   "--batch-size", "4").exit_code == 0
        make_image_folder(photos, 20, start=start)
    table = lancedb.connect(str(index / "lancedb")).open_table(table_folder(index, "color").name[: -len(".lance")])
    assert len(table.list_versions()) == 1
    condition, = json.loads(cli("conditions", "--index", index, "--json").stdout)["conditions"]
    on_disk = sum(p.stat().st_size for p in table_folder(index, "color").rglob("*") if p.is_file())
    assert condition["bytes"] == on_disk and condition["rows"] == 60


# --- commit cadence --------------------------------------------------------------------------------


def test_a_run_killed_at_its_first_progress_report_keeps_rows(tmp_path, tiny_focal):
    """The bar moves only after a batch's commit check, and a run's first batch is committed at
    once: a kill as soon as the bar has moved finds rows in every condition, whatever the timing."""
    from focalsearch.store import Store

    photos = tmp_path / "photos"
    make_image_folder(photos, 600, size=(160, 120))
    index = tmp_path / "index"
    two = ["-i", "color", "-i", "shape"]
    process, terminal = start_in_terminal(focalsearch_command("index", photos, *two, "--model", tiny_focal, "--index", index,
                                                              "--batch-size", "8", "--workers", "1"))
    try:
        wait_for_output(terminal, process, r"\b[1-9]\d*/600\b")  # tqdm's first count above 0
        process.kill()
    finally:
        process.kill()
        process.wait()
        os.close(terminal)
    store = Store(index)
    rows = {c.instruction: store.count(c) for c in store.conditions()}
    assert set(rows) == {"color", "shape"}
    assert all(0 < n < 600 for n in rows.values()), rows  # kept rows, and was stopped part-way

    rerun = run("index", photos, *two, "--index", index, "--json")
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout)
    assert report["conditions"] == {"color": 600, "shape": 600}
    assert report["encoded"] + report["unchanged"] == 600 and report["unchanged"] >= min(rows.values())
    assert check_json(index)["ok"]  # a deep read: no id twice


# --- 10: small ones --------------------------------------------------------------------------------


def test_an_empty_text_query_is_an_error(indexed):
    one_line_error(cli("query", "--text", "  ", "-i", "color", "--index", indexed["index"]), 2, "empty text query")


def test_a_condition_without_rows_says_so(tmp_path, tiny_focal):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("index", empty, "-i", "color", "--model", tiny_focal, "--index", tmp_path / "i").exit_code == 0
    one_line_error(cli("query", "--text", "red", "-i", "color", "--index", tmp_path / "i"), 2, '"color" has no rows yet')


def test_long_and_quoted_instructions_are_cut_and_shell_quoted(indexed):
    long = "x" * 10_000
    line = one_line_error(cli("query", "--text", "red", "-i", long, "--index", indexed["index"]), 2, "not indexed")
    assert len(line) < 1000
    quoted = "what's the \"main\" colour?"
    line = one_line_error(cli("query", "--text", "red", "-i", quoted, "--index", indexed["index"]), 2)
    suggested = line.split("add it with: ")[1]
    import shlex

    words = shlex.split(suggested)
    assert words[words.index("--instruction") + 1] == quoted
    assert words[words.index("--index") + 1] == str(indexed["index"].resolve())


def test_no_transformers_noise_on_stderr(indexed):
    result = run("query", "--text", "red", "-i", "color", "--index", indexed["index"])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    from focalsearch import FocalSearch

    library = subprocess.run(
        [os.sys.executable, "-c", f"from focalsearch import FocalSearch; FocalSearch({str(indexed['index'])!r}).search(text='red', instruction='shape')"],
        capture_output=True, text=True,
    )
    assert library.returncode == 0 and library.stderr == "", library.stderr
    assert FocalSearch is not None


@pytest.mark.parametrize("command", [(), ("index",), ("query",), ("check",), ("conditions",), ("bench",)])
def test_help_shows_flags_without_a_bool_metavar(command):
    result = cli(*command, "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.output and "--help" in result.output


def test_gitignore_covers_the_quick_start_models():
    ignored = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().split()
    assert "/models/" in ignored or "models/" in ignored


# --- 8: threads ---------------------------------------------------------------------------------


def test_threads_option_and_sleeping_workers(indexed):
    fresh = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    report = "print(n, torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))"
    # torch imported first: the policy could no longer take effect, so it is not claimed.
    late = f"import os, torch; from focalsearch.threads import configure_threads; n = configure_threads(1); {report}"
    out = subprocess.run([os.sys.executable, "-c", late], capture_output=True, text=True, env=fresh).stdout.split()
    assert out == ["1", "1", "None"]
    lazy = f"import os; from focalsearch.threads import configure_threads; n = configure_threads(1); import torch; {report}"
    out = subprocess.run([os.sys.executable, "-c", lazy], capture_output=True, text=True, env=fresh).stdout.split()
    assert out == ["1", "1", "PASSIVE"]
    chosen = subprocess.run([os.sys.executable, "-c", lazy], capture_output=True, text=True, env={**fresh, "GOMP_SPINCOUNT": "1000"})
    assert chosen.stdout.split()[2] == "None"  # the user's own policy is kept
    result = cli("query", "--text", "red", "-i", "color", "--index", indexed["index"], "--threads", "1", "--json")
    assert result.exit_code == 0, result.output


def test_a_failure_while_cleaning_up_after_ctrl_c_still_reports_the_interrupt(capsys):
    """Ctrl-C can cut a LanceDB write off half-way, so the cleanup that follows may fail too: that is still exit 130."""
    import typer

    from focalsearch.cli import _run
    from focalsearch.errors import StorageError

    def interrupted_then_cleanup_fails():
        try:
            raise KeyboardInterrupt
        finally:
            raise StorageError("cannot write the index at /x: commit conflict")

    with pytest.raises(typer.Exit) as stopped:
        _run(interrupted_then_cleanup_fails)
    assert stopped.value.exit_code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted; committed batches are kept, rerun the same command to resume"


@pytest.mark.skipif(not can_mount_tmpfs(), reason="mounting a tmpfs needs root")
def test_a_streamed_search_index_on_a_full_disk_is_built_in_memory(tmp_path):
    import numpy as np

    from focalsearch.search import build_condition_index, faiss_files
    from focalsearch.store import FileRecord, Store, row_id

    store = Store(tmp_path / "index", create=True)
    condition = store.ensure_condition("color", "m", "focallens", 16)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.add(condition, [FileRecord(row_id(f"/img/{i}.jpg"), f"/img/{i}.jpg", 1, 1, "h", 1, 1) for i in range(3000)], vectors)
    folder = faiss_files(store, condition)[0].parent
    with small_tmpfs("64k") as disk:  # the lists file needs 3000 x (64 + 8) bytes
        folder.symlink_to(disk, target_is_directory=True)
        index = build_condition_index(store, condition, exact_max_rows=1000)
        assert index.ann.kind == "ivf" and index.ann.data_file is None  # built in memory, the process alive
        assert not list(disk.glob("*.ivfdata*"))
        hits = [int(p) for p in index.ann.index.search(vectors[:5], 1)[1].ravel()]
        assert hits == [0, 1, 2, 3, 4]
