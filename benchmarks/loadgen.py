"""The API benchmarks' HTTP client: aiohttp by default, httpx on request (`--client httpx`).

The load generator shares the two cores with the server it measures, so its own cost per
request decides how much of the machine the server gets. On this VM, 50 concurrent clients
in one process cost about 2.9 ms of CPU per request with httpx's AsyncClient and 0.12 ms
with aiohttp (the same 3,000 GETs of a 2 kB JSON body from a trivial FastAPI app, measured
with getrusage), so httpx alone could keep one core busy at 350 requests per second. Both
clients keep their connections alive and drop idle ones after `keepalive` seconds, before
uvicorn closes them at 5 s (a request sent on a connection the server is closing would fail
and count as the server's error).
"""

from __future__ import annotations

import asyncio
import ssl
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, NamedTuple

import aiohttp
import httpx

CLIENTS = ("aiohttp", "httpx")
ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, httpx.HTTPError)


class Reply(NamedTuple):
    status: int
    headers: object  # case-insensitive mapping: Server-Timing, X-Cache
    body: bytes


Send = Callable[..., Awaitable[Reply]]


@asynccontextmanager
async def session(kind: str, base: str, *, headers: dict | None = None, timeout: float = 120.0,
                  ca: str | None = None, connections: int = 100, keepalive: float = 2.0) -> AsyncIterator[Send]:
    """A keep-alive client for `base`; yields `send(method, path, *, json=None, params=None, headers=None)`."""
    if kind == "aiohttp":
        connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=keepalive,
                                         ssl=ssl.create_default_context(cafile=ca) if ca else True)
        async with aiohttp.ClientSession(base_url=base, headers=headers, connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async def send(method: str, path: str, *, json=None, params=None, headers=None) -> Reply:
                async with s.request(method, path, json=json, params=params, headers=headers) as r:
                    return Reply(r.status, r.headers, await r.read())

            yield send
    elif kind == "httpx":
        limits = httpx.Limits(max_connections=connections, keepalive_expiry=keepalive)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout, verify=ca or True,
                                     limits=limits) as c:
            async def send(method: str, path: str, *, json=None, params=None, headers=None) -> Reply:
                r = await c.request(method, path, json=json, params=params, headers=headers)
                return Reply(r.status_code, r.headers, r.content)

            yield send
    else:
        raise ValueError(f"--client must be one of {', '.join(CLIENTS)}, got {kind!r}")
