"""S3 backend on the minio SDK: MinIO in the cluster, SeaweedFS's S3 gateway in tests."""

from __future__ import annotations

import contextlib
import io
import pathlib
import threading
from collections.abc import Iterator
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from shared.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shared.settings import Settings, load_settings
from shared.storage.base import ArtifactStore, validate_key
from shared.storage.lease import DEFAULT_TTL

# Objects above this size go up as a parallel multipart upload of parts this big.
PART_SIZE = 16 * 1024 * 1024
_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# A conditional write or delete whose condition failed (or raced another conditional request).
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    if not url.startswith("s3://"):
        raise InvalidArgument(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise InvalidArgument(f"{url!r} names no bucket")
    prefix = prefix.strip("/")
    if prefix:
        validate_key(prefix, "store prefix")
    return bucket, prefix


def make_client(settings: Settings) -> Minio:
    endpoint = settings.s3_endpoint
    if not endpoint:
        raise FailedPrecondition("an s3:// store needs TRAINYARD_S3_ENDPOINT (host:port) in the environment")
    secure = settings.s3_secure
    # Accept AWS_ENDPOINT_URL-style values too; the scheme then decides TLS.
    for scheme, tls in (("https://", True), ("http://", False)):
        if endpoint.startswith(scheme):
            endpoint, secure = endpoint[len(scheme) :], tls
    return Minio(
        endpoint.rstrip("/"),
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=secure,
        # A fixed region spares the SDK a GetBucketLocation round trip per bucket.
        region=settings.s3_region or "us-east-1",
    )


class _Body(io.RawIOBase):
    """A GET response as a raw stream that hands its connection back to the pool on close."""

    def __init__(self, response):
        self._resp = response

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self._resp.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._resp.close()
            self._resp.release_conn()
        super().close()


class S3Store(ArtifactStore):
    # A holder on another host cannot be checked: its lease lapses unless renewed (shared.storage.lease).
    lease_ttl = DEFAULT_TTL

    def __init__(
        self, bucket: str, prefix: str = "", settings: Settings | None = None, client: Minio | None = None
    ):
        self.settings = settings or load_settings()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or make_client(self.settings)
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._bucket_ready = False
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None) -> S3Store:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, settings=settings)

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except S3Error as exc:
            if exc.code in _MISSING:
                raise NotFound(f"{key!r} does not exist in {self.url}") from None
            if exc.code in _DENIED:
                raise FailedPrecondition(
                    f"{self.url} refused the credentials "
                    f"in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY ({exc.code})"
                ) from exc
            raise Unavailable(f"{self.url}: {key!r}: {exc.code}: {exc.message}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"object store {self.settings.s3_endpoint} unreachable: {exc}") from exc

    def _ensure_bucket(self) -> None:
        # Only writers create the bucket; a read of a missing bucket is simply NotFound.
        if self._bucket_ready:
            return
        with self._lock, self._errors(self.bucket):
            if not self.client.bucket_exists(bucket_name=self.bucket):
                try:
                    self.client.make_bucket(bucket_name=self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    def _write_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket()
        with self._errors(key):
            self.client.put_object(
                bucket_name=self.bucket, object_name=self._name(key), data=io.BytesIO(data), length=len(data)
            )

    def _write_file(self, key: str, path: pathlib.Path) -> None:
        self._ensure_bucket()
        with self._errors(key):
            self.client.fput_object(
                bucket_name=self.bucket,
                object_name=self._name(key),
                file_path=str(path),
                part_size=PART_SIZE,
                num_parallel_uploads=4,
            )

    def _open(self, key: str) -> BinaryIO:
        with self._errors(key):
            resp = self.client.get_object(bucket_name=self.bucket, object_name=self._name(key))
        return io.BufferedReader(_Body(resp), buffer_size=1 << 20)

    def _list(self, prefix: str) -> list[str]:
        root = f"{self.prefix}/" if self.prefix else ""
        start = f"{self._name(prefix)}/" if prefix else root
        try:
            with self._errors(prefix or "<root>"):
                objects = self.client.list_objects(bucket_name=self.bucket, prefix=start, recursive=True)
                return [
                    obj.object_name[len(root) :]
                    for obj in objects
                    if not obj.is_dir and not obj.object_name.endswith("/")
                ]
        except NotFound:  # no bucket yet: nothing stored
            return []

    def _exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                stat = self.client.stat_object(bucket_name=self.bucket, object_name=self._name(key))
        except NotFound:
            return False
        # Some gateways answer a HEAD on a directory of keys; only a real object counts.
        return not (stat.is_dir or (stat.object_name or "").endswith("/"))

    def _delete(self, key: str) -> None:
        with self._errors(key):
            try:
                self.client.remove_object(bucket_name=self.bucket, object_name=self._name(key))
            except S3Error as exc:
                if exc.code not in _MISSING:
                    raise

    def _delete_prefix(self, prefix: str) -> None:
        names = [self._name(k) for k in self._list(prefix)]
        with self._errors(prefix):
            for i in range(0, len(names), 1000):  # S3's DeleteObjects limit
                batch = [DeleteObject(n) for n in names[i : i + 1000]]
                errors = list(self.client.remove_objects(bucket_name=self.bucket, delete_object_list=batch))
                if errors:
                    raise Unavailable(f"deleting {prefix!r} in {self.url}: {errors[0]}")

    # ---- leases: S3 conditional requests (If-None-Match / If-Match), which MinIO and SeaweedFS honour.
    # The SDK's put_object turns unknown headers into user metadata, so these go through its request layer.

    def _lease_read(self, key: str) -> tuple[bytes, str] | None:
        try:
            with self._errors(key):
                resp = self.client.get_object(bucket_name=self.bucket, object_name=self._name(key))
                try:
                    return resp.read(), resp.headers.get("etag", "").strip('"')
                finally:
                    resp.close()
                    resp.release_conn()
        except NotFound:
            return None

    def _lease_write(self, key: str, data: bytes, version: str | None) -> str | None:
        self._ensure_bucket()
        headers = {"If-None-Match": "*"} if version is None else {"If-Match": f'"{version}"'}
        with self._errors(key):
            try:
                result = self.client._put_object(self.bucket, self._name(key), data, headers=headers)
            except S3Error as exc:
                if exc.code in _CONDITION_FAILED or (version is not None and exc.code in _MISSING):
                    return None
                raise
        return result.etag

    def _lease_delete(self, key: str, version: str) -> None:
        with self._errors(key):
            try:
                self.client._execute("DELETE", self.bucket, self._name(key), headers={"If-Match": f'"{version}"'})
            except S3Error as exc:
                if exc.code not in _CONDITION_FAILED and exc.code not in _MISSING:
                    raise
