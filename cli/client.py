"""The sponsor CLI's connection to the coordinator's API: base URL, CA and tokens.

Where the coordinator is and who you are come from the environment
(`EVOCLONE_COORDINATOR_URL`, `EVOCLONE_COORDINATOR_CA`, `EVOCLONE_TOKEN`) or from the file
`evoclone login` writes (`$EVOCLONE_CONFIG`, default `~/.config/evoclone/coordinator.json`,
mode 0600). An expired access token is refreshed once with the stored refresh token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx

TIMEOUT = 30.0


class ClientError(RuntimeError):
    """A request the coordinator refused or could not answer (one line; exit code in .code)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def config_path() -> Path:
    """Where `evoclone login` keeps the coordinator's address and the tokens."""
    return Path(os.environ.get("EVOCLONE_CONFIG") or Path.home() / ".config" / "evoclone" / "coordinator.json")


def save_config(doc: dict) -> Path:
    """Write the config file readable by its owner only."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def _load() -> dict:
    path = config_path()
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        raise ClientError(f"{path} is unreadable; run `evoclone login` again", 2) from None


@dataclass
class Coordinator:
    """An authenticated connection to the coordinator's API."""

    url: str
    ca: str | None
    access: str | None
    refresh: str | None

    @classmethod
    def from_env(cls, *, need_token: bool = True) -> "Coordinator":
        """From the environment, else the login file; a clear error when neither says where to go."""
        doc = _load()
        url = os.environ.get("EVOCLONE_COORDINATOR_URL") or doc.get("url")
        if not url:
            raise ClientError("no coordinator address: set EVOCLONE_COORDINATOR_URL or run `evoclone login --url "
                              "https://coordinator:8443`", 2)
        token = os.environ.get("EVOCLONE_TOKEN") or doc.get("access_token")
        if need_token and not token:
            raise ClientError("not logged in: run `evoclone login` or set EVOCLONE_TOKEN", 2)
        return cls(url=url.rstrip("/"), ca=os.environ.get("EVOCLONE_COORDINATOR_CA") or doc.get("ca"),
                   access=token, refresh=None if os.environ.get("EVOCLONE_TOKEN") else doc.get("refresh_token"))

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=TIMEOUT, verify=self.ca or True)

    def login(self, username: str, password: str) -> dict:
        """Exchange a password for a token pair."""
        with self._client() as c:
            r = self._send(c, "POST", "/api/v1/auth/token", data={"username": username, "password": password},
                           auth=False)
        return r

    def _send(self, c: httpx.Client, method: str, path: str, *, auth: bool = True, **kw) -> dict:
        headers = {"Authorization": f"Bearer {self.access}"} if auth and self.access else {}
        try:
            r = c.request(method, path, headers=headers, **kw)
        except httpx.ConnectError as exc:
            raise ClientError(f"cannot reach the coordinator at {self.url} ({exc}); check the address and that "
                              "`evoclone coordinator serve` runs") from None
        except httpx.HTTPError as exc:
            raise ClientError(f"{method} {path} failed: {exc}") from None
        if r.status_code == 401 and auth and self.refresh:
            self._refresh(c)
            return self._send(c, method, path, auth=auth, **kw) if self.refresh else {}
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:200]
            if isinstance(detail, list):  # FastAPI's validation errors: the first one is enough for one line
                detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail[:2])
            raise ClientError(f"{method} {path}: {r.status_code} {detail}", 2 if r.status_code < 500 else 1)
        return r.json() if r.content else {}

    def _refresh(self, c: httpx.Client) -> None:
        r = c.post("/api/v1/auth/refresh", json={"refresh_token": self.refresh})
        self.refresh = None  # one attempt per command
        if r.status_code != 200:
            raise ClientError("the session expired; run `evoclone login` again", 2)
        pair = r.json()
        self.access, refresh = pair["access_token"], pair.get("refresh_token")
        doc = _load()
        if doc:
            save_config({**doc, "access_token": self.access, "refresh_token": refresh})

    def request(self, method: str, path: str, **kw) -> dict:
        """One authenticated API call; the JSON answer, or ClientError."""
        with self._client() as c:
            return self._send(c, method, path, **kw)
