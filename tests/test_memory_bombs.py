"""Issue 23 item 2: no upload or query image can take gigabytes.

A 13000x13000 PNG is about 2 MB on disk and 676 MB once decoded (Pillow keeps RGB in 4 bytes a
pixel). These tests read the real server's peak RSS (/proc/PID/status VmHWM) around uploads, and
the real CLI's peak RSS (wait4's ru_maxrss), and check the query-image cap and the server's pixel
budget (focalsearch.server.budget) that keeps large uploads from being decoded all at once.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import httpx
import pytest
from starlette.exceptions import HTTPException
from typer.testing import CliRunner

from conftest import make_image_folder
from focalsearch.cli import app as cli_app
from focalsearch.defaults import DEFAULT_MAX_QUERY_PIXELS
from focalsearch.server.budget import PixelBudget
from hardening_helpers import focalsearch_command

MB = 1 << 20
HUGE = 13000
SERVER_CAP = 16_000_000  # the served index's --max-query-pixels: 4000x4000 fits
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")


def write_png(path: Path, width: int, height: int, channels: int = 3) -> Path:
    """A width x height 8-bit PNG (gray, gray+alpha, RGB or RGBA), streamed row by row so that this
    process never holds the decoded image; its rows repeat, so it compresses to a few MB."""
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    line = b"\x00" + bytes((i * 7) % 251 for i in range(width * channels))  # filter 0, then a gradient
    packer = zlib.compressobj(6)
    rows = 64
    parts = [packer.compress(line * rows) for _ in range(height // rows)]
    parts += [packer.compress(line * (height % rows)), packer.flush()]
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)))
        f.write(chunk(b"IDAT", b"".join(parts)))
        f.write(chunk(b"IEND", b""))
    return path


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; returns that RSS in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    rss = status_kb(pid, "VmRSS") * 1024
    assert status_kb(pid, "VmHWM") * 1024 <= rss + 16 * MB, "VmHWM was not reset"
    return rss


def peak_rise(pid: int, baseline: int) -> int:
    rise = status_kb(pid, "VmHWM") * 1024 - baseline
    print(f"peak RSS rise: {rise / MB:.0f} MB")
    return rise


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    return {
        "huge": write_png(root / "huge13k.png", HUGE, HUGE),
        "at_cap": write_png(root / "at-cap.png", 4000, 4000, channels=4),
        "24mp": write_png(root / "24mp.png", 6000, 4000, channels=4),  # under the default cap
        "small": next(iter(sorted(make_image_folder(root / "photos", 3, size=(64, 48))))),
        "photos": root / "photos",
    }


@pytest.fixture(scope="module")
def index(files, tiny_focal, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("bomb-index") / "index"
    done = CliRunner().invoke(cli_app, ["index", str(files["photos"]), "-i", "color", "--model", str(tiny_focal), "--index", str(index)])
    assert done.exit_code == 0, done.output
    return index


@pytest.fixture(scope="module")
def server(index):
    from test_server import wait_until_serving

    process = subprocess.Popen(
        focalsearch_command("serve", "--index", index, "--port", "0", "--max-query-pixels", SERVER_CAP, "--threads", "1"),
        stderr=subprocess.PIPE, text=True,
    )
    try:
        url = wait_until_serving(process)
        yield {"url": url, "pid": process.pid}
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def upload(url: str, path: Path) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(f"{url}/api/search", files={"image": (path.name, f, "image/png")},
                          data={"instruction": "color", "k": "3"}, timeout=300)


def upload_at_once(url: str, path: Path, n: int) -> list[httpx.Response]:
    responses: list[httpx.Response | BaseException] = [None] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        try:
            responses[i] = upload(url, path)
        except BaseException as exc:  # reported below, not lost in the thread
            responses[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for response in responses:
        if isinstance(response, BaseException):
            raise response
    return responses


def warmed(server, files) -> int:
    """Warm the server with a small upload, then reset its peak RSS; the baseline in bytes."""
    assert upload(server["url"], files["small"]).status_code == 200
    return reset_peak(server["pid"])


def assert_refused_as_too_large(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert "13000x13000" in message and "--max-query-pixels" in message and "\n" not in message


# --- the server -------------------------------------------------------------------------------


def test_one_huge_png_upload_is_refused_from_its_header(server, files):
    baseline = warmed(server, files)
    assert_refused_as_too_large(upload(server["url"], files["huge"]))
    assert peak_rise(server["pid"], baseline) <= 600 * MB


def test_eight_huge_png_uploads_at_once(server, files):
    baseline = warmed(server, files)
    for response in upload_at_once(server["url"], files["huge"], 8):
        assert_refused_as_too_large(response)
    assert peak_rise(server["pid"], baseline) <= 1200 * MB


def test_uploads_at_the_cap_are_decoded_one_after_another(server, files):
    """Eight 16 MP RGBA uploads at once, each about 220 MB to decode and encode: all answered, and
    the budget keeps the peak near one of them (decoded together, they took about 1.7 GB)."""
    baseline = warmed(server, files)
    alone = upload(server["url"], files["at_cap"])
    assert alone.status_code == 200, alone.text
    one = peak_rise(server["pid"], baseline)
    assert 100 * MB < one <= 600 * MB  # the image was really decoded, and within the budget
    baseline = reset_peak(server["pid"])
    responses = upload_at_once(server["url"], files["at_cap"], 8)
    assert all(r.status_code in (200, 503) for r in responses), [r.text for r in responses]
    assert sum(r.status_code == 200 for r in responses) >= 1
    assert all(r.json()["results"] == alone.json()["results"] for r in responses if r.status_code == 200)
    assert peak_rise(server["pid"], baseline) <= one + 300 * MB


def test_an_upload_one_pixel_row_over_the_cap_is_refused(server, files, tmp_path):
    over = write_png(tmp_path / "over.png", 4000, 4001)
    response = upload(server["url"], over)
    assert response.status_code == 400
    assert f"limit of {SERVER_CAP} pixels" in response.json()["error"]


# --- the CLI ----------------------------------------------------------------------------------


def run_with_peak(argv: list[str]) -> tuple[int, str, int]:
    """Run a command; its exit code, stderr, and peak RSS in bytes."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    print(f"peak RSS: {usage.ru_maxrss / 1024:.0f} MB")
    return process.returncode, stderr, usage.ru_maxrss * 1024


def test_cli_query_on_a_huge_png_exits_2_under_1_gb(index, files):
    code, stderr, peak = run_with_peak(focalsearch_command("query", files["huge"], "-i", "color", "--index", index))
    assert code == 2, stderr
    line = stderr.strip()
    assert line.startswith("error:") and "\n" not in line
    assert "13000x13000" in line and f"limit of {DEFAULT_MAX_QUERY_PIXELS} pixels" in line and "--max-query-pixels" in line
    assert peak < 1000 * MB


def test_cli_query_on_a_24_mp_rgba_png_works_under_1_gb(index, files):
    code, stderr, peak = run_with_peak(focalsearch_command("query", files["24mp"], "-i", "color", "--index", index))
    assert code == 0, stderr
    assert peak < 1000 * MB


def test_cli_max_query_pixels_moves_the_cap(index, files):
    code, stderr, _ = run_with_peak(focalsearch_command("query", files["24mp"], "-i", "color", "--index", index,
                                                        "--max-query-pixels", 6000 * 4000 - 1))
    assert code == 2 and "6000x4000" in stderr and "limit of 23999999 pixels" in stderr


# --- the pixel budget -------------------------------------------------------------------------


def test_budget_serves_in_order_and_gives_back_on_exit():
    async def scenario():
        budget = PixelBudget(10, wait_seconds=5)
        order = []

        async def request(name: str, pixels: int, hold: float):
            async with budget.ticket() as ticket:
                await ticket.take(pixels)
                order.append(name)
                assert budget.in_flight <= budget.limit
                await asyncio.sleep(hold)

        first = asyncio.create_task(request("big", 8, 0.2))
        await asyncio.sleep(0.01)
        others = [asyncio.create_task(request("large", 6, 0.05)), asyncio.create_task(request("small", 1, 0))]
        await asyncio.sleep(0.01)
        late = asyncio.create_task(request("late-small", 1, 0))
        await asyncio.gather(first, *others, late)
        return order, budget.in_flight

    order, left = asyncio.run(scenario())
    # "small" fits beside "big" but waits its turn behind "large": first come, first served
    assert order == ["big", "large", "small", "late-small"] and left == 0


def test_budget_answers_503_after_waiting_and_lets_the_next_in():
    async def scenario():
        budget = PixelBudget(10, wait_seconds=0.1)
        async with budget.ticket() as holder:
            await holder.take(10)
            with pytest.raises(HTTPException) as refused:
                async with budget.ticket() as waiter:
                    await waiter.take(5)
            assert budget.in_flight == 10 and not budget._waiting
        async with budget.ticket() as after:
            await after.take(10)  # all given back
        return refused.value, budget.in_flight

    refused, left = asyncio.run(scenario())
    assert refused.status_code == 503 and "busy" in refused.detail and left == 0
