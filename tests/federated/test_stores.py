"""One contract per store, run against the embedded default and the production backend."""

import uuid

import pytest

from evoclone.federated.stores.cache import MemoryCache, RedisCache, open_cache
from evoclone.federated.stores.eventlog import MongoEventLog, SqlEventLog, open_event_log
from evoclone.federated.stores.objects import LocalObjectStore, MinioObjectStore

from ..servers import mongo_server, s3_server


@pytest.fixture(scope="module")
def mongo_url(tmp_path_factory):
    with mongo_server(tmp_path_factory.mktemp("mongo")) as url:
        yield url


@pytest.fixture(scope="module")
def s3_endpoint():
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["sqlite", "mongodb"])
def event_log(request, tmp_path):
    if request.param == "sqlite":
        log = open_event_log(f"sqlite:///{tmp_path / 'events.db'}")
        assert isinstance(log, SqlEventLog)
    else:
        log = MongoEventLog(url=request.getfixturevalue("mongo_url"), database=f"t{uuid.uuid4().hex[:8]}")
    yield log
    log.close()


def test_event_log_contract(event_log):
    assert event_log.count() == 0
    event_log.append(kind="ingest", document={"accepted": 3, "rejected": 0})
    assert event_log.append_many(kind="round", documents=[{"round": i} for i in range(250)]) == 250
    assert event_log.count() == 251 and event_log.count(kind="round") == 250
    latest = event_log.query(kind="round", limit=3)
    assert [d["round"] for d in latest] == [249, 248, 247] and all(d["kind"] == "round" and "at" in d for d in latest)
    assert event_log.query(kind="ingest")[0]["accepted"] == 3
    assert event_log.append_many(kind="x", documents=[]) == 0
    with pytest.raises(ValueError):
        event_log.append(kind="x", document=["not", "a", "dict"])


@pytest.fixture(params=["memory", "redis"])
def cache(request):
    ns = f"t{uuid.uuid4().hex[:8]}"
    c = open_cache("memory://" if request.param == "memory" else "redis://127.0.0.1:6379/0", namespace=ns)
    assert isinstance(c, MemoryCache if request.param == "memory" else RedisCache)
    yield c
    c.delete_prefix("")
    c.close()


def test_cache_contract(cache):
    assert cache.get("a") is None
    cache.set("a", b"1", ttl=60)
    assert cache.get("a") == b"1"
    cache.set("model-v1:p1", b"x", ttl=60)
    cache.set("model-v1:p2", b"y", ttl=60)
    cache.set("model-v2:p1", b"z", ttl=60)
    assert cache.delete_prefix("model-v1:") == 2
    assert cache.get("model-v1:p1") is None and cache.get("model-v2:p1") == b"z"
    assert cache.delete("a") is True and cache.delete("a") is False
    cache.set("short", b"s", ttl=0.001)
    deadline = __import__("time").monotonic() + 5
    while cache.get("short") is not None:  # expiry, polled rather than slept for
        assert __import__("time").monotonic() < deadline
    with pytest.raises(ValueError):
        cache.set("k", b"v", ttl=0)


def test_cache_namespaces_are_isolated():
    a = open_cache("redis://127.0.0.1:6379/0", namespace=f"a{uuid.uuid4().hex[:6]}")
    b = open_cache("redis://127.0.0.1:6379/0", namespace=f"b{uuid.uuid4().hex[:6]}")
    a.set("k", b"1", ttl=30)
    assert b.get("k") is None and b.delete_prefix("") == 0 and a.get("k") == b"1"
    a.delete_prefix("")
    with pytest.raises(ValueError):
        open_cache("memcached://x", namespace="n")


@pytest.fixture(params=["local", "s3"])
def objects(request, tmp_path):
    if request.param == "local":
        yield LocalObjectStore(root=tmp_path / "objects")
    else:
        yield MinioObjectStore(endpoint=request.getfixturevalue("s3_endpoint"), access_key="test", secret_key="test1234",
                               bucket=f"t{uuid.uuid4().hex[:10]}", secure=False, region="us-east-1")


def test_object_store_contract(objects):
    assert objects.list() == [] and not objects.exists("models/v1/model.safetensors")
    objects.put("models/v1/model.safetensors", b"\x00" * 1000)
    objects.put("models/v1/manifest.json", b"{}")
    objects.put("snapshots/site-1.safetensors", b"snap")
    assert objects.get("models/v1/manifest.json") == b"{}"
    objects.put("models/v1/manifest.json", b'{"v": 2}')
    assert objects.get("models/v1/manifest.json") == b'{"v": 2}'
    assert objects.list("models/") == ["models/v1/manifest.json", "models/v1/model.safetensors"]
    objects.delete("snapshots/site-1.safetensors")
    assert not objects.exists("snapshots/site-1.safetensors")
    with pytest.raises(KeyError):
        objects.get("snapshots/site-1.safetensors")
    for bad in ("../etc/passwd", "/abs", "a//b", ""):
        with pytest.raises(ValueError):
            objects.put(bad, b"x")
