"""The artifact store against a local directory and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from shared.errors import AlreadyExists, FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from shared.storage import MANIFEST_NAME, LocalStore, S3Store, open_location, open_store, split_location
from shared.storage.s3 import PART_SIZE


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(f"file://{tmp_path / 'store'}")
    return open_store(request.getfixturevalue("s3_store_url"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bytes_and_file_round_trip(store, tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 7)
    store.put_bytes("blobs/one.bin", data)
    assert sha(store.get_bytes("blobs/one.bin")) == sha(data)

    src = tmp_path / "src.bin"
    src.write_bytes(data[::-1])
    store.put_file("blobs/two.bin", src)
    out = store.get_file("blobs/two.bin", tmp_path / "dl" / "two.bin")
    assert out.read_bytes() == data[::-1]
    assert not [p for p in out.parent.iterdir() if p.name != "two.bin"], "temp file left behind"

    store.put_bytes("blobs/one.bin", b"replaced")
    assert store.get_bytes("blobs/one.bin") == b"replaced"
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_streaming_read(store):
    data = os.urandom(5 * 1024 * 1024 + 123)
    store.put_bytes("stream/big.bin", data)
    digest, total, reads = hashlib.sha256(), 0, 0
    with store.open_read("stream/big.bin") as f:
        while chunk := f.read(64 * 1024):
            digest.update(chunk)
            total += len(chunk)
            reads += 1
    assert (total, digest.hexdigest()) == (len(data), sha(data))
    assert reads > 80  # it really came in pieces
    with store.open_read("stream/big.bin") as f:
        assert f.read(10) == data[:10]  # closing early must not hang or fail


def test_list_exists_delete(store):
    for key in ["a/b.txt", "a/c/d.txt", "ab/e.txt", "z.txt"]:
        store.put_bytes(key, key.encode())
    assert store.list() == ["a/b.txt", "a/c/d.txt", "ab/e.txt", "z.txt"]
    assert store.list("a") == ["a/b.txt", "a/c/d.txt"]  # a directory, so not ab/
    assert store.list("a/") == store.list("a")
    assert store.list("nothing/here") == []
    assert store.exists("a/b.txt") and not store.exists("a/zz.txt")
    assert not store.exists("a")  # a directory of keys is not a key

    store.delete("a/b.txt")
    store.delete("a/b.txt")  # deleting twice is fine
    assert not store.exists("a/b.txt")
    with pytest.raises(NotFound, match="a/b.txt"):
        store.get_bytes("a/b.txt")
    with pytest.raises(NotFound):
        store.open_read("never/was")

    store.delete_prefix("a")
    assert store.list() == ["ab/e.txt", "z.txt"]
    store.delete_prefix("a")  # an empty prefix is fine too
    with pytest.raises(InvalidArgument):
        store.delete_prefix("")


BAD_KEYS = ["../x", "a/../../b", "/etc/passwd", "a//b", "", "a/", ".", "a/./b", "a\\b", "C:/x", "x/.tytmp-1"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected(key, tmp_path):
    store = LocalStore(tmp_path / "store")
    for op in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.publish("p", {key: b"x"}),
    ):
        with pytest.raises(InvalidArgument):
            op()
    assert not any(tmp_path.rglob("x")), "nothing may be written outside the store"


def test_bad_keys_rejected_on_s3(s3_store_url):
    store = open_store(s3_store_url)
    for key in BAD_KEYS:
        with pytest.raises(InvalidArgument):
            store.put_bytes(key, b"x")
    assert store.list() == []


def test_unpublished_until_manifest_lands(store, tmp_path):
    prefix = "datasets/digits/v1"
    # A writer that crashed mid-publish: files uploaded, no manifest.
    store.put_bytes(f"{prefix}/train.bin", b"train")
    store.put_bytes(f"{prefix}/test.bin", b"test")
    assert not store.is_published(prefix)
    with pytest.raises(NotFound, match="not published"):
        store.read_manifest(prefix)
    with pytest.raises(NotFound):
        store.get_verified(prefix, "train.bin")
    assert store.list_published("datasets") == []

    # The same crash through publish itself: a later file is missing, so no manifest is written.
    with pytest.raises(NotFound, match="missing.bin"):
        store.publish(prefix, {"train.bin": b"train", "test.bin": tmp_path / "missing.bin"})
    assert not store.is_published(prefix)

    local = tmp_path / "test.bin"
    local.write_bytes(b"test-bytes")
    manifest = store.publish(prefix, {"train.bin": b"train", "test.bin": local}, meta={"classes": 10})
    assert store.is_published(prefix)
    assert store.list_published("datasets") == [prefix]
    assert store.list_published() == [prefix]
    read = store.read_manifest(prefix)
    assert read.files == manifest.files
    assert read.files["test.bin"].size == 10 and read.files["test.bin"].sha256 == sha(b"test-bytes")
    assert read.meta == {"classes": 10} and read.created
    doc = json.loads(store.get_bytes(f"{prefix}/{MANIFEST_NAME}"))
    assert doc["version"] == 1 and set(doc["files"]) == {"train.bin", "test.bin"}
    assert store.get_verified(prefix, "test.bin") == b"test-bytes"

    with pytest.raises(AlreadyExists):
        store.publish(prefix, {"train.bin": b"again"})
    store.publish(prefix, {"train.bin": b"v2"}, overwrite=True)
    assert set(store.read_manifest(prefix).files) == {"train.bin"}
    assert store.get_verified(prefix, "train.bin") == b"v2"
    with pytest.raises(InvalidArgument, match=MANIFEST_NAME):
        store.publish("other", {MANIFEST_NAME: b"{}"})


def test_publish_dir_and_download_dir(store, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    files = {"model.safetensors": os.urandom(200_000), "sub/card.json": b'{"name": "m"}', "sub/x.txt": b""}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    store.publish_dir("models/m/1", src, meta={"run_id": "r1"})
    store.publish_dir("models/m/2", src)
    assert store.list_published("models") == ["models/m/1", "models/m/2"]

    dest = store.download_dir("models/m/1", tmp_path / "out")
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == files
    assert store.read_manifest("models/m/1").meta == {"run_id": "r1"}


def test_corruption_is_detected(store, tmp_path):
    good, weights = b"intact", os.urandom(4096)
    store.publish("ckpt/7", {"good.txt": good, "weights.bin": weights, "short.bin": b"0123456789"})
    flipped = bytes([weights[0] ^ 0xFF]) + weights[1:]
    # Behind the manifest's back: same size with one byte changed, and a truncated file.
    store.put_bytes("ckpt/7/weights.bin", flipped)
    store.put_bytes("ckpt/7/short.bin", b"01234")

    assert store.get_verified("ckpt/7", "good.txt") == good
    with pytest.raises(IntegrityError, match="weights.bin.*sha256"):
        store.get_verified("ckpt/7", "weights.bin")
    with pytest.raises(IntegrityError, match="short.bin.*size"):
        store.get_verified("ckpt/7", "short.bin")
    with pytest.raises(NotFound, match="nope.bin"):
        store.get_verified("ckpt/7", "nope.bin")

    dest = tmp_path / "dl"
    with pytest.raises(IntegrityError, match="short.bin|weights.bin"):
        store.download_dir("ckpt/7", dest)
    # The corrupt file never lands under its real name, and no temp file is left.
    assert sorted(p.name for p in dest.iterdir()) == ["good.txt"]


def test_corrupt_manifest_is_integrity_error(store):
    store.put_bytes(f"broken/{MANIFEST_NAME}", b"{not json")
    assert store.is_published("broken")
    with pytest.raises(IntegrityError, match="not a valid manifest"):
        store.read_manifest("broken")


def test_local_writes_are_atomic_files(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_bytes("a/b", b"1")
    with pytest.raises(FailedPrecondition):
        store.put_bytes("a", b"a is a directory of keys")
    # A staged temp file (a writer still running, or one that died) is never listed.
    (tmp_path / "s" / "a" / ".tytmp-partial").write_bytes(b"half")
    assert store.list() == ["a/b"]
    assert [p.name for p in (tmp_path / "s" / "a").iterdir() if p.name != ".tytmp-partial"] == ["b"]


def test_open_store_urls(tmp_path, monkeypatch):
    assert isinstance(open_store(str(tmp_path / "plain")), LocalStore)
    assert isinstance(open_store(tmp_path / "pathlike"), LocalStore)
    store = open_store(f"file://{tmp_path / 'f'}")
    assert store.url == f"file://{tmp_path / 'f'}"
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRAINYARD_STORE", raising=False)
    default = open_store()
    assert isinstance(default, LocalStore) and default.root == tmp_path / "home" / "artifacts"
    with pytest.raises(InvalidArgument, match="unsupported"):
        open_store("gs://bucket/x")
    with pytest.raises(InvalidArgument):
        open_store("s3:///nobucket")
    with pytest.raises(InvalidArgument):
        open_store("s3://bucket/../up")
    monkeypatch.delenv("TRAINYARD_S3_ENDPOINT", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with pytest.raises(FailedPrecondition, match="TRAINYARD_S3_ENDPOINT"):
        open_store("s3://bucket/x")


def test_s3_wrong_credentials_and_missing_bucket(s3_server, s3_store_url, monkeypatch):
    store = open_store(s3_store_url)
    store.put_bytes("k", b"v")
    assert isinstance(store, S3Store)
    # A store on a bucket nobody created: reads are NotFound, listing is empty, nothing is created.
    ghost = open_store("s3://no-such-bucket-here/x")
    assert ghost.list() == [] and not ghost.exists("k")
    with pytest.raises(NotFound):
        ghost.get_bytes("k")
    assert not s3_server.client().bucket_exists(bucket_name="no-such-bucket-here")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(FailedPrecondition, match="credentials"):
        open_store(s3_store_url).get_bytes("k")


def test_s3_store_creates_its_bucket(s3_server, s3_store_url):
    bucket = "created-by-store"
    store = open_store(f"s3://{bucket}/p")
    store.put_bytes("x", b"1")
    assert s3_server.client().bucket_exists(bucket_name=bucket)
    assert store.get_bytes("x") == b"1"
    s3_server.client().remove_object(bucket_name=bucket, object_name="p/x")
    s3_server.client().remove_bucket(bucket_name=bucket)


def upload_and_verify(s3_server, store, tmp_path, mb: int) -> None:
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(mb):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            f.write(chunk)

    t0 = time.perf_counter()
    store.put_file("big/big.bin", path)
    upload_s = time.perf_counter() - t0
    stat = s3_server.client().stat_object(bucket_name=store.bucket, object_name=f"{store.prefix}/big/big.bin")
    assert stat.size == mb * 1024 * 1024
    # A multipart upload's ETag is "<md5 of the part md5s>-<part count>".
    assert stat.etag.endswith(f"-{-(-stat.size // PART_SIZE)}")

    t0 = time.perf_counter()
    read_digest = hashlib.sha256()
    with store.open_read("big/big.bin") as f:
        while chunk := f.read(1 << 20):
            read_digest.update(chunk)
    download_s = time.perf_counter() - t0
    assert read_digest.hexdigest() == digest.hexdigest()
    print(
        f"\n{mb} MB to SeaweedFS: upload {upload_s:.2f}s ({mb / upload_s:.0f} MB/s), "
        f"streamed download {download_s:.2f}s ({mb / download_s:.0f} MB/s)"
    )
    store.delete("big/big.bin")
    assert not store.exists("big/big.bin")


def test_s3_multipart_upload_40mb(s3_server, s3_store_url, tmp_path):
    upload_and_verify(s3_server, open_store(s3_store_url), tmp_path, 40)


# 17-27 s on the shared 2-core box (SeaweedFS's CPU time is the bottleneck), so it is slow;
# the 40 MB case above keeps multipart covered in `make test-fast`.
@pytest.mark.slow
def test_s3_multipart_upload_200mb(s3_server, s3_store_url, tmp_path):
    upload_and_verify(s3_server, open_store(s3_store_url), tmp_path, 200)


def test_split_and_open_location(tmp_path, s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    assert split_location(f"{tmp_path}/data/digits/") == (f"file://{tmp_path}/data", "digits")
    assert split_location(f"file://{tmp_path}/x") == (f"file://{tmp_path}", "x")
    assert split_location("s3://bucket/datasets/x") == ("s3://bucket/datasets", "x")
    with pytest.raises(InvalidArgument):
        split_location("s3://bucket")
    with pytest.raises(InvalidArgument):
        split_location("gs://bucket/x")

    store, prefix = open_location(f"{tmp_path}/data/digits")
    store.publish(prefix, {"a.bin": b"a"})
    assert LocalStore(tmp_path / "data").list_published() == ["digits"]
    s3_store, s3_prefix = open_location(f"s3://{s3_server.bucket}/tests/locations/ds")
    s3_store.publish(s3_prefix, {"a.bin": b"a"})
    assert open_store(f"s3://{s3_server.bucket}/tests/locations").get_verified("ds", "a.bin") == b"a"


def test_opening_a_local_store_to_read_creates_nothing(tmp_path):
    from shared.errors import NotFound
    from shared.storage import open_store

    root = tmp_path / "not" / "there"
    store = open_store(str(root))
    assert store.list() == [] and not store.exists("a") and not store.is_published("x")
    with pytest.raises(NotFound):
        store.read_manifest("x")
    assert not (tmp_path / "not").exists()
    store.put_bytes("a/b", b"1")
    assert store.get_bytes("a/b") == b"1"
