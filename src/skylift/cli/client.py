"""The management API client the CLI commands share: credentials, requests, errors.

``skylift login`` stores the hub URL, the token and (optionally) the CA that
signed the hub's certificate in ``$XDG_CONFIG_HOME/skylift/credentials.json``
(mode 0600, in a 0700 directory). ``SKYLIFT_HUB``, ``SKYLIFT_TOKEN`` and
``SKYLIFT_CA`` override it, which is what CI uses.

The token never appears in anything this module prints or raises: errors
name the hub's URL and the hub's one-line answer, never a header.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from skylift.errors import SkyliftError, UserInputError
from skylift.fsutil import atomic_write, read_bounded

__all__ = [
    "ApiError",
    "Credentials",
    "HubClient",
    "credentials_path",
    "hub_url",
    "load_credentials",
    "save_credentials",
    "segment",
]

_MAX_CREDENTIALS = 64 * 1024
#: Requests are bounded in time (each read and write of a chunk upload too).
_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
#: The API's largest page.
PAGE_LIMIT = 500
#: Pages one listing follows at most, whatever the hub answers.
MAX_PAGES = 1000
_HINTS = {
    401: "run 'skylift login' again, or check SKYLIFT_TOKEN",
    403: "ask an admin for a token with that role",
}


class ApiError(SkyliftError):
    """The hub refused a request, or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class Credentials:
    """Where the hub is and how to prove who we are."""

    url: str
    token: str
    ca: Path | None = None

    def __repr__(self) -> str:  # never the token, not even in a debugger's output
        return f"Credentials(url={self.url!r}, token='***', ca={self.ca!r})"


def hub_url(url: str) -> str:
    """``url`` as the base the client uses: https, a host, no trailing ``/`` or ``/api/v1``.

    Raises:
        UserInputError: not an https URL with a host. Plain http would send the
            token where anyone on the path could read it; the hub speaks TLS only.
    """
    text = url.strip().rstrip("/")
    text = text.removesuffix("/api/v1").rstrip("/")
    try:
        parts = urlsplit(text)
        ok = parts.scheme == "https" and bool(parts.hostname) and parts.port != 0
    except ValueError:
        ok = False
    if not ok or parts.query or parts.fragment:
        raise UserInputError(
            f"{url[:200]!r} is not an https URL of a hub", hint="e.g. https://hub.example:8080"
        )
    return text


def segment(value: str, what: str) -> str:
    """``value`` as one URL path segment: quoted, never ``.``, ``..`` or empty.

    Raises:
        UserInputError: empty, or a dot segment a URL would resolve away.
    """
    if value in ("", ".", ".."):
        raise UserInputError(f"{value!r} is not a {what}")
    return quote(value, safe="")


def credentials_path() -> Path:
    """Where ``skylift login`` keeps credentials."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "skylift" / "credentials.json"


def save_credentials(creds: Credentials) -> Path:
    """Store credentials with mode 0600 (the directory 0700 when created here)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"url": creds.url, "token": creds.token, "ca": str(creds.ca) if creds.ca else None}
    atomic_write(path, json.dumps(doc, indent=2).encode(), mode=0o600)
    return path


def load_credentials() -> Credentials:
    """Credentials from the environment, else from ``skylift login``'s file.

    Raises:
        UserInputError: none, or the file is malformed.
    """
    env_url, env_token = os.environ.get("SKYLIFT_HUB"), os.environ.get("SKYLIFT_TOKEN")
    env_ca = os.environ.get("SKYLIFT_CA")
    if env_url and env_token:
        return Credentials(hub_url(env_url), env_token.strip(), Path(env_ca) if env_ca else None)
    path = credentials_path()
    if not path.is_file():
        raise UserInputError(
            "not logged in to a hub",
            hint="run 'skylift login URL', or set SKYLIFT_HUB and SKYLIFT_TOKEN",
        )
    try:
        doc = json.loads(read_bounded(path, _MAX_CREDENTIALS, "credentials"))
        url, token, ca = doc["url"], doc["token"], doc.get("ca")
        if not isinstance(url, str) or not isinstance(token, str):
            raise TypeError("url and token must be strings")
        return Credentials(hub_url(url), token, Path(ca) if ca else None)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserInputError(f"{path} is malformed", hint="run 'skylift login' again") from e


def _verify(ca: Path | None) -> ssl.SSLContext | bool:
    if ca is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise UserInputError(
            f"cannot use {ca} as the hub's CA certificate: {getattr(e, 'strerror', None) or e}",
            hint="pass the PEM file that signed the hub's certificate (skylift login --ca)",
        ) from e


def _error_message(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        message = doc["error"]
    else:
        message = response.text
    # One printable line, whatever a proxy in between answered.
    line = " ".join(message.split())
    return line[:300] or response.reason_phrase or "no detail"


class HubClient:
    """Calls the management API; every failure is an :class:`ApiError` with one line."""

    def __init__(self, creds: Credentials, *, transport: httpx.BaseTransport | None = None) -> None:
        """A client of ``creds``' hub; ``transport`` replaces the network (for tests)."""
        self.creds = creds
        #: Whether the last :meth:`pages` stopped before the hub's list ended.
        self.more = False
        self._http = httpx.Client(
            base_url=creds.url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Bearer {creds.token}"},
            verify=_verify(creds.ca),
            timeout=_TIMEOUT,
            follow_redirects=False,  # a redirect must not carry the token elsewhere
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; raise ApiError for transport failures and 3xx/4xx/5xx answers."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(
                f"cannot reach the hub at {self.creds.url}: {type(e).__name__}: {e}"[:300],
                hint="check the URL, the network and the CA (skylift login --ca)",
            ) from e
        if response.status_code >= 300:
            raise ApiError(
                f"hub answered {response.status_code}: {_error_message(response)}",
                status=response.status_code,
                hint=_HINTS.get(response.status_code),
            )
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of a request (None for 204)."""
        response = self.request(method, path, **kwargs)
        if response.status_code == 204:
            return None
        try:
            return response.json()
        except ValueError as e:
            raise ApiError(f"the hub's answer to {method} {path} is not JSON") from e

    def pages(
        self, path: str, params: Sequence[tuple[str, str]], limit: int
    ) -> Iterator[dict[str, Any]]:
        """Items of a cursor-paged list, following ``next_cursor`` for at most ``limit`` items.

        Stops after :data:`MAX_PAGES` pages or at an empty page, whatever the
        cursor says, so that a confused hub cannot keep it going for ever.
        ``self.more`` tells afterwards whether the hub had more than were read.
        """
        self.more = False
        cursor: str | None = None
        seen = 0
        for _ in range(MAX_PAGES):
            size = min(PAGE_LIMIT, limit - seen)
            query = [*params, ("limit", str(size)), *([("cursor", cursor)] if cursor else [])]
            page = self.json("GET", path, params=query)
            items = page.get("items") if isinstance(page, dict) else None
            if not isinstance(items, list):
                raise ApiError(f"the hub's answer to GET {path} is not a list page")
            yield from items[:size]
            seen += min(len(items), size)
            cursor = page.get("next_cursor")
            if not cursor or not items:
                return
            if seen >= limit:
                self.more = True
                return
        self.more = bool(cursor)
