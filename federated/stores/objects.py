"""Objects (models, snapshots, backups): local files by default, MinIO / S3 in production."""

from __future__ import annotations

import io
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,511}$")


def _check(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/") or "//" in key:
        raise ValueError("object keys are relative paths of letters, digits, '.', '_', '-' and '/'")
    return key


class ObjectStore(ABC):
    """Put and get whole objects by key."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` (replacing it atomically)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; KeyError when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the key holds an object."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (absent keys are fine)."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under a prefix, sorted."""


class LocalObjectStore(ObjectStore):
    """A directory tree; writes go to a temporary file then `os.replace`."""

    def __init__(self, *, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        keys = [p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                if p.is_file() and not p.name.endswith(".tmp")]
        return sorted(k for k in keys if k.startswith(prefix))


class MinioObjectStore(ObjectStore):
    """A bucket on MinIO or any S3 API (the `minio` client)."""

    def __init__(self, *, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = True,
                 region: str | None = None) -> None:
        from minio import Minio

        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region)
        self.bucket = bucket
        if not self.client.bucket_exists(bucket):
            self.client.make_bucket(bucket)

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(self.bucket, _check(key), io.BytesIO(data), length=len(data))

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            resp = self.client.get_object(self.bucket, _check(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise KeyError(key) from None
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.bucket, _check(key))
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, _check(key))

    def list(self, prefix: str = "") -> list[str]:
        return sorted(o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True))
