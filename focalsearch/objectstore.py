"""Images in object storage (s3://, gs://, az://) through pyarrow's filesystems.

The only module that talks to object stores. An object's identity for the incremental diff is its
size and LastModified time, as a file's is its size and mtime. Credentials come from the usual
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, ...); `--storage-option
KEY=VALUE` adds to them, for S3-compatible servers such as MinIO: endpoint (or aws_endpoint),
region, allow_http, access_key_id, secret_access_key, session_token.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from focalsearch.errors import UserError

SCHEMES = ("s3", "gs", "gcs", "az", "abfs")
_options: dict[str, str] = {}
_lock = threading.Lock()


def is_uri(path: object) -> bool:
    """Whether ``path`` names an object-store location rather than a local path."""
    return isinstance(path, str) and urlparse(path).scheme in SCHEMES and "://" in path


def parse_options(pairs: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings into a dict, with a one-line error for anything else."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--storage-option takes KEY=VALUE, not {pair!r}")
        options[key.strip().lower()] = value.strip()
    return options


def configure(options: dict[str, str]) -> None:
    """Set the storage options this process uses for every object-store location."""
    global _options
    with _lock:
        _options = dict(options)
        _filesystem.cache_clear()


def current_options() -> dict[str, str]:
    return dict(_options)


def _option(*names: str) -> str | None:
    for name in names:
        if name in _options:
            return _options[name]
    return None


@functools.lru_cache(maxsize=8)
def _filesystem(scheme: str):
    from pyarrow import fs

    if scheme == "s3":
        endpoint = _option("endpoint", "aws_endpoint", "endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
        allow_http = (_option("allow_http", "aws_allow_http") or "").lower() in ("1", "true", "yes")
        kwargs = {
            "access_key": _option("access_key_id", "aws_access_key_id"),
            "secret_key": _option("secret_access_key", "aws_secret_access_key"),
            "session_token": _option("session_token", "aws_session_token"),
            "region": _option("region", "aws_region"),
        }
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or endpoint
            kwargs["scheme"] = parsed.scheme or ("http" if allow_http else "https")
        return fs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})
    if scheme in ("gs", "gcs"):
        return fs.GcsFileSystem()
    return fs.AzureFileSystem(account_name=_option("account_name", "azure_storage_account_name") or os.environ["AZURE_STORAGE_ACCOUNT_NAME"])


def _split(uri: str):
    parsed = urlparse(uri)
    return _filesystem(parsed.scheme), f"{parsed.netloc}{parsed.path}".rstrip("/")


def _error(uri: str, exc: Exception) -> UserError:
    return UserError(f"cannot read {uri}: {' '.join(str(exc).split())[:200]}")


def list_objects(uri: str) -> list[tuple[str, int, int]]:
    """(uri, size, mtime_ns) of every object under ``uri`` (a prefix, or one object); raises UserError when missing."""
    from pyarrow import fs

    filesystem, path = _split(uri)
    scheme = urlparse(uri).scheme
    try:
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File:
            infos = [info]
        elif info.type == fs.FileType.Directory:
            infos = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
        else:
            raise UserError(f"path not found: {uri}")
    except OSError as exc:
        raise _error(uri, exc) from exc
    return [
        (f"{scheme}://{i.path}", int(i.size), int(i.mtime_ns or 0))
        for i in infos if i.type == fs.FileType.File
    ]


def exists(uri: str) -> bool:
    try:
        return bool(list_objects(uri))
    except UserError:
        return False


def stat(uri: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of one object, or None if it is not there."""
    from pyarrow import fs

    filesystem, path = _split(uri)
    try:
        info = filesystem.get_file_info(path)
    except OSError:
        return None
    return (int(info.size), int(info.mtime_ns or 0)) if info.type == fs.FileType.File else None


def read(uri: str) -> bytes | str:
    """An object's bytes, or a one-line reason why it cannot be read."""
    filesystem, path = _split(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"unreadable: {' '.join(str(exc).split())[:200]}"


_LANCE_KEYS = {
    "endpoint": "aws_endpoint", "aws_endpoint": "aws_endpoint", "endpoint_url": "aws_endpoint",
    "allow_http": "allow_http", "aws_allow_http": "allow_http",
    "access_key_id": "aws_access_key_id", "aws_access_key_id": "aws_access_key_id",
    "secret_access_key": "aws_secret_access_key", "aws_secret_access_key": "aws_secret_access_key",
    "session_token": "aws_session_token", "aws_session_token": "aws_session_token",
    "region": "aws_region", "aws_region": "aws_region",
}


def lance_options() -> dict[str, str]:
    """The storage options in LanceDB's names (other keys pass through as given)."""
    return {_LANCE_KEYS.get(key, key): value for key, value in _options.items()}


def cache_dir(uri: str) -> Path:
    """A local folder for what is derived from an index in object storage (FAISS files, thumbnails)."""
    base = Path(os.environ.get("FOCALSEARCH_CACHE") or Path.home() / ".cache" / "focalsearch")
    return base / "indexes" / hashlib.sha1(uri.encode()).hexdigest()[:16]


def write(uri: str, data: bytes) -> None:
    """Put ``data`` at ``uri``; raises OSError when it cannot."""
    filesystem, path = _split(uri)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


_COPY_CHUNK = 8 << 20


def upload(local: Path, uri: str) -> None:
    """Copy a local file to ``uri`` in chunks (a multi-GB FAISS file never sits in memory); raises OSError."""
    filesystem, path = _split(uri)
    with open(local, "rb") as source, filesystem.open_output_stream(path) as sink:
        shutil.copyfileobj(source, sink, _COPY_CHUNK)


def download(uri: str, local: Path) -> None:
    """Copy the object at ``uri`` to ``local`` in chunks, replacing it only once complete; raises OSError."""
    filesystem, path = _split(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".download")
    try:
        with filesystem.open_input_stream(path) as source, open(tmp, "wb") as sink:
            shutil.copyfileobj(source, sink, _COPY_CHUNK)
        tmp.replace(local)
    finally:
        tmp.unlink(missing_ok=True)


def delete(uri: str) -> None:
    """Remove one object; a missing one is not an error."""
    filesystem, path = _split(uri)
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass
