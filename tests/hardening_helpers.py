"""Real failure conditions for tests: a small full filesystem, and a user without root's power over files."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

NOBODY = 65534
_AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
# Root without capabilities: file modes then apply to it as to its owner (no CAP_DAC_OVERRIDE).
_AS_ROOT_WITHOUT_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


def focalsearch_command(*args: object) -> list[str]:
    """The CLI as a separate process, with this interpreter."""
    return [sys.executable, "-m", "focalsearch.cli", *map(str, args)]


def shared_dir(prefix: str) -> Path:
    """A fresh folder that an unprivileged user can enter (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


def unprivileged_prefix() -> tuple[list[str], str]:
    """How to run a command so that file permissions bind it, and who it runs as.

    As root (CI), the command runs as user nobody when nobody can run this interpreter and import
    focalsearch; otherwise as root with every capability dropped. As any other user, it runs as is.
    """
    if os.geteuid() != 0:
        return [], "the current user"
    probe = subprocess.run([*_AS_NOBODY, sys.executable, "-c", "import focalsearch.cli"], capture_output=True, cwd="/")
    if probe.returncode == 0:
        return _AS_NOBODY, "nobody"
    return _AS_ROOT_WITHOUT_CAPABILITIES, "root without capabilities"


def run_unprivileged(argv: list[str], home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    prefix, _ = unprivileged_prefix()
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, env=env, cwd=str(home), timeout=timeout)


def can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="focalsearch-mount-probe-"))
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (for example "3m") mounted on a fresh folder, unmounted afterwards."""
    folder = shared_dir("focalsearch-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def resize_tmpfs(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Write a filler file until the filesystem of ``folder`` has at most ``leave`` bytes free."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "ab") as f:
        while True:
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[: max(1, min(len(chunk), free - leave))])
                f.flush()
            except OSError:
                break
    return filler


def start_in_terminal(argv: list[str]) -> tuple[subprocess.Popen, int]:
    """Start ``argv`` with its stderr on a pseudo-terminal of 120 columns, as a user's shell would
    (progress bars draw only there); returns the process and the terminal's reading end."""
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm draws nothing 0 columns wide
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=writer)
    finally:
        os.close(writer)
    return process, reader


def wait_for_output(reader: int, process: subprocess.Popen, pattern: str, timeout: float = 300) -> re.Match:
    """Read the terminal until ``pattern`` shows; fails if the process ends or ``timeout`` passes first."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([reader], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(reader, 4096)
            except OSError:  # the process closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"exited ({process.wait()}) before {pattern!r} showed: {seen[-500:]!r}")
            seen += chunk.decode(errors="replace")
            found = re.search(pattern, seen)
            if found:
                return found
    raise AssertionError(f"{pattern!r} did not show within {timeout} s: {seen[-500:]!r}")
