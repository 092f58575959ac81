"""The management API client the CLI commands share: credentials, requests, errors.

``skylift login`` stores the hub URL, the token and (optionally) the CA that
signed the hub's certificate in ``$XDG_CONFIG_HOME/skylift/credentials.json``
(mode 0600). ``SKYLIFT_HUB``, ``SKYLIFT_TOKEN`` and ``SKYLIFT_CA`` override
it, which is what CI uses.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from skylift.errors import SkyliftError, UserInputError
from skylift.fsutil import atomic_write, read_bounded

__all__ = ["ApiError", "Credentials", "HubClient", "credentials_path", "load_credentials"]

_MAX_CREDENTIALS = 64 * 1024
#: Requests are bounded in time; uploads get longer.
_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


class ApiError(SkyliftError):
    """The hub refused a request, or could not be reached."""


@dataclass(frozen=True)
class Credentials:
    """Where the hub is and how to prove who we are."""

    url: str
    token: str
    ca: Path | None = None


def credentials_path() -> Path:
    """Where ``skylift login`` keeps credentials."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "skylift" / "credentials.json"


def save_credentials(creds: Credentials) -> Path:
    """Store credentials with mode 0600."""
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
        return Credentials(env_url, env_token, Path(env_ca) if env_ca else None)
    path = credentials_path()
    if not path.is_file():
        raise UserInputError(
            "not logged in to a hub",
            hint="run 'skylift login URL', or set SKYLIFT_HUB and SKYLIFT_TOKEN",
        )
    try:
        doc = json.loads(read_bounded(path, _MAX_CREDENTIALS, "credentials"))
        return Credentials(doc["url"], doc["token"], Path(doc["ca"]) if doc.get("ca") else None)
    except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{path} is malformed", hint="run 'skylift login' again") from e


class HubClient:
    """Calls the management API; every failure is an :class:`ApiError` with one line."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        verify: ssl.SSLContext | bool = True
        if creds.ca is not None:
            verify = ssl.create_default_context(cafile=str(creds.ca))
        self._http = httpx.Client(
            base_url=creds.url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Bearer {creds.token}"},
            verify=verify,
            timeout=_TIMEOUT,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; raise ApiError for transport failures and 4xx/5xx answers."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(
                f"cannot reach the hub at {self.creds.url}: {type(e).__name__}: {e}"[:300],
                hint="check the URL, the network and the CA (skylift login --ca)",
            ) from e
        if response.status_code >= 400:
            try:
                message = str(response.json().get("error", ""))
            except ValueError:
                message = response.text[:200]
            raise ApiError(f"hub answered {response.status_code}: {message or 'no detail'}")
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of a request (None for 204)."""
        response = self.request(method, path, **kwargs)
        return None if response.status_code == 204 else response.json()
