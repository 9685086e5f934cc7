"""What keeps other web sites away from a server on a desktop (design §3b).

A page on any site can make the visitor's browser send requests to 127.0.0.1. Three rules stop it:

- **Host.** A DNS-rebinding page reaches the server under its own name (``Host: rebind.evil``).
  Only the bound address, ``localhost``, loopback IPs and the names given as allowed hosts are
  answered; any IP literal is answered too when the server binds every address (0.0.0.0 or ::),
  since a browser sends an IP literal only when it connected to that IP. The port is not compared.
  ``*`` turns the Host check off (the CLI allows that only with a token).
- **Origin.** A request whose ``Origin`` is not this server's own origin (scheme, host and port of
  the request), including ``Origin: null``, is refused; so is one that the browser marks
  ``Sec-Fetch-Site: cross-site`` or ``same-site`` without an Origin, bar a top-level navigation.
- **Content type.** A body sent to ``/api`` must be ``application/json`` or ``multipart/form-data``,
  so a "simple" cross-site ``text/plain`` post is refused (415) even where a browser sends no Origin.

Every refusal is a one-line ``{"error": ...}`` with 403 (or 415).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from focalsearch import errors

ANY_HOST = "*"
MAX_JSON_DEPTH = 32
_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
_DEFAULT_PORT = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _refuse(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())[:500]}, status_code=status)


def _shown(value: str) -> str:
    return ascii(value[:100])


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header (or an Origin's authority) as (lower-case host without brackets, port); None when malformed."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/\\@?# \t"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, colon, port_text = value.partition(":")
        rest = colon + port_text
        if ":" in port_text:  # a bare IPv6 address is not a valid Host
            return None
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and int(rest[1:]) <= 65535):
        return None
    return host.rstrip("."), int(rest[1:]) if rest else None


def allowed_host_problem(value: str) -> str | None:
    """Why ``value`` cannot be an allowed host name, or None when it can."""
    if value == ANY_HOST:
        return None
    parsed = split_host(value)
    if parsed is None or not parsed[0] or parsed[1] is not None or value.startswith("["):
        return f"an allowed host is a bare name or IP address such as mybox.local or 192.168.1.5, not {_shown(value)}"
    return None


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class HostPolicy:
    """Which Host values a server bound to ``bind_host`` answers."""

    def __init__(self, bind_host: str, allowed_hosts: Iterable[str] = ()):
        allowed = list(allowed_hosts)
        for value in allowed:
            problem = allowed_host_problem(value)
            if problem:
                raise errors.UserError(problem)
        self.any = ANY_HOST in allowed
        bound = bind_host.strip("[]").lower()
        self.names = {"localhost", bound} | {split_host(v)[0] for v in allowed if v != ANY_HOST}
        address = _ip(bound)
        self.every_address = address is not None and address.is_unspecified  # 0.0.0.0 or ::
        self.shown = ", ".join(sorted(self.names))

    def allows(self, host: str) -> bool:
        if self.any or host in self.names:
            return True
        address = _ip(host)
        if address is None:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        return address.is_loopback or (mapped is not None and mapped.is_loopback) or self.every_address or str(address) in self.names


def _same_origin(origin: str, scheme: str, host: str, port: int | None) -> bool:
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme != scheme or parts.path not in ("", "/") or parts.query or parts.username is not None:
        return False
    parsed = split_host(parts.netloc)
    if parsed is None:
        return False
    default = _DEFAULT_PORT.get(scheme)
    return parsed[0] == host and (origin_port or default) == (port or default)


def media_type(content_type: str) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return content_type.split(";", 1)[0].strip().lower()


class SiteGuard:
    """ASGI middleware: the Host, Origin and content-type rules of this module, before anything else runs."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refusal = self.check(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def check(self, scope) -> JSONResponse | None:
        headers = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
        host_header = headers.get("host")
        if host_header is None:  # HTTP/1.0 without Host: not a browser, so not a rebinding
            host, port = None, None
        else:
            parsed = split_host(host_header)
            if parsed is None or not self.policy.allows(parsed[0]):
                return _refuse(403, f"this server does not answer to the host {_shown(host_header)}; it answers to {self.policy.shown}"
                                    f" (another name must be allowed when the server starts)")
            host, port = parsed
        origin = headers.get("origin")
        if origin is not None:
            if host is None or not _same_origin(origin, scheme, host, port):
                return _refuse(403, f"cross-site request refused: Origin {_shown(origin)} is not this server")
        else:
            site = headers.get("sec-fetch-site", "").lower()
            navigation = scope.get("method") in ("GET", "HEAD") and headers.get("sec-fetch-mode", "").lower() == "navigate" \
                and headers.get("sec-fetch-dest", "document").lower() == "document"
            if site in ("cross-site", "same-site") and not navigation:
                return _refuse(403, f"cross-site request refused: the browser marks it Sec-Fetch-Site: {site}")
        if scope["type"] == "http" and scope.get("method") in _BODY_METHODS and scope.get("path", "").startswith("/api"):
            kind = media_type(headers.get("content-type", ""))
            if kind not in ("application/json", "multipart/form-data"):
                shown = _shown(kind) if kind else "none"
                return _refuse(415, f"content-type {shown} is not accepted: send JSON as application/json, or an upload as multipart/form-data")
        return None


def loads_json(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` for request bodies: nesting deeper than ``max_depth``, or a number too long to
    convert, is a UserError, never a RecursionError or ValueError; malformed JSON is a JSONDecodeError."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise errors.UserError(f"the JSON is nested too deeply (at most {max_depth} levels)") from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # the one other failure: an integer beyond Python's 4,300-digit conversion limit
        raise errors.UserError("the JSON holds a number too long to read") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > max_depth:
                raise errors.UserError(f"the JSON is nested too deeply (at most {max_depth} levels)")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value
