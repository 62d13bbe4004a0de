"""storage.Store on a local folder and on a real S3 server: the same behaviour, atomic publish, leftovers,
coalesced ranged reads and one-line errors naming the URL."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from airflow_provider_mmprep import storage
from airflow_provider_mmprep.storage import StorageError, Store
from airflow_provider_mmprep.testing.s3_server import SeaweedS3

MiB = 2**20


def test_url_detection_and_joining() -> None:
    assert storage.is_url("s3://b/p") and storage.is_url("gs://b") and storage.is_url("memory://x")
    assert not storage.is_url("/data/x") and not storage.is_url("rel/x") and not storage.is_url("file:///data")
    assert not storage.is_url("C:\\data")
    assert storage.join("s3://b/p/", "a", "b.tar") == "s3://b/p/a/b.tar"
    assert storage.join("/data", "a", "b.tar") == os.path.join("/data", "a", "b.tar")
    assert storage.relative_to("s3://b/p/a/x.tar", "s3://b/p/") == "a/x.tar"
    assert storage.relative_to("/data/p/a/x.tar", "/data/p") == "a/x.tar"
    with pytest.raises(ValueError):
        storage.relative_to("s3://b/q/x.tar", "s3://b/p")


def test_storage_options_resolve_env_references_late() -> None:
    env = {"MY_KEY": "AK", "MY_SECRET": "SK"}
    flat = {"key": "${env:MY_KEY}", "secret": "${oc.env:MY_SECRET}", "client_kwargs": {"region_name": "eu"}}
    assert storage.resolve_options(flat, "s3://b/x", environ=env) == {
        "key": "AK", "secret": "SK", "client_kwargs": {"region_name": "eu"}}
    by_prefix = {"s3://b": {"key": "outer"}, "s3://b/inner": {"key": "${env:MY_KEY}"}, "s3://c": {"key": "c"}}
    assert storage.resolve_options(by_prefix, "s3://b/inner/p", environ=env) == {"key": "AK"}
    assert storage.resolve_options(by_prefix, "s3://b/innerx", environ=env) == {"key": "outer"}
    assert storage.resolve_options(by_prefix, "s3://d/x", environ=env) == {}
    assert storage.resolve_options({"key": "${env:UNSET_X,dflt}"}, "s3://b", environ={}) == {"key": "dflt"}
    with pytest.raises(StorageError, match=r"^storage_options\.secret: environment variable NOPE is not set$"):
        storage.resolve_options({"secret": "${env:NOPE}"}, "s3://b", environ={})
    with pytest.raises(StorageError, match="mixes"):
        storage.resolve_options({"s3://b": {}, "key": "x"}, "s3://b", environ={})


@pytest.fixture(params=["local", "s3", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same store behaviour on a local folder, S3 and fsspec's in-memory filesystem (any other URL's
    generic path: no multipart upload of ours, temporary name then move)."""
    if request.param == "local":
        return Store(tmp_path / "root")
    if request.param == "memory":
        return Store(f"memory://mmprep-{tmp_path.name}/root")
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Store(f"s3://{bucket}/root", server.storage_options)


def test_write_list_read(store: Store) -> None:
    store.write_bytes("a/00000.tar", b"x" * 1000)
    store.write_bytes("a/00001.tar", b"y" * 10)
    store.write_bytes("a/00000.tar.manifest.json", b"{}")
    store.write_bytes("a/.hidden.tar", b"h")
    store.write_bytes(".mmprep/state.json", b"s")
    store.write_bytes("top.tar", b"t")
    assert store.list_files("a", "*.tar") == ["a/00000.tar", "a/00001.tar"]
    assert store.list_files("", "*.tar") == ["top.tar"]
    assert store.list_files("", "*.tar", recursive=True) == ["a/00000.tar", "a/00001.tar", "top.tar"]
    assert store.list_files("missing") == []
    assert store.exists("a/00001.tar") and not store.exists("a/00002.tar")
    assert store.is_file("a/00001.tar") and not store.is_file("a/00009.tar")
    assert store.size("a/00000.tar") == 1000
    assert store.read_bytes("a/00001.tar") == b"y" * 10
    with store.open_read("a/00000.tar") as handle:
        assert handle.read(3) == b"xxx" and len(handle.read()) == 997
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/nothing")
    assert store.sub("a").list_files() == ["00000.tar", "00000.tar.manifest.json", "00001.tar"]
    store.remove("a/00001.tar")
    store.remove("a/00001.tar")  # absent: no error
    assert not store.exists("a/00001.tar")


def test_ranged_reads_are_exact_and_coalesced(store: Store) -> None:
    data = random.Random(7).randbytes(3 * MiB + 123)
    store.write_bytes("blob.bin", data)
    rng = random.Random(11)
    ranges = []
    for _ in range(200):
        start = rng.randrange(len(data))
        ranges.append((start, min(len(data), start + rng.randrange(1, 70_000))))
    ranges += [(0, 512), (len(data) - 512, len(data)), (100, 100)]
    assert store.read_ranges("blob.bin", ranges) == [data[s:e] for s, e in ranges]
    # without coalescing (every range its own request) the result is the same
    assert store.read_ranges("blob.bin", ranges[:20], gap=-1) == [data[s:e] for s, e in ranges[:20]]
    assert store.read_range("blob.bin", 5, 9) == data[5:9]
    with pytest.raises(OSError, match="short read"):
        store.read_ranges("blob.bin", [(len(data) - 4, len(data) + 4)])


def test_open_write_commits_only_on_success(store: Store) -> None:
    payload = random.Random(3).randbytes(12 * MiB)  # more than two 5 MiB parts: a multipart upload
    with store.open_write("out/00000.tar", part_size=5 * MiB) as handle:
        for i in range(0, len(payload), MiB):
            handle.write(payload[i:i + MiB])
    assert store.read_bytes("out/00000.tar") == payload
    with pytest.raises(RuntimeError, match="boom"):
        with store.open_write("out/00001.tar", part_size=5 * MiB) as handle:
            handle.write(payload)
            raise RuntimeError("boom")
    assert not store.exists("out/00001.tar")
    assert store.list_files("out") == ["out/00000.tar"]
    if store.protocol == "s3":  # the aborted multipart upload is gone too
        bucket = store._path.split("/")[0]
        assert store.fs.list_multipart_uploads(bucket) == []


def test_uploads_from_the_reused_part_buffer_are_exact(s3_server: SeaweedS3, s3_bucket: str, tmp_path: Path) -> None:
    """One upload after another through the part buffer they share: tails cut in place (at least half a
    part) and copied (less), whole parts, a file read straight in, an empty object: each reads back exact."""
    store = Store(f"s3://{s3_bucket}/reuse", s3_server.storage_options)
    part = 5 * MiB
    rng = random.Random(11)
    sizes = [part + part // 2 + 3, 2 * part + 100, 2 * part, part - 1, 7, 0, 3 * part // 4]
    expected = {}
    for number, size in enumerate(sizes):
        data = rng.randbytes(size)
        source = tmp_path / f"{number}.bin"
        source.write_bytes(data[size // 3:])
        with store.open_write(f"{number:05d}.tar", part_size=part) as handle:
            handle.write(data[:size // 3])
            with open(source, "rb", buffering=0) as piece:
                assert storage.copy_file_into(handle, piece) == size - size // 3
            assert handle.tell() == size
        expected[f"{number:05d}.tar"] = data
    assert store.read_many(expected) == expected
    assert store.fs.list_multipart_uploads(s3_bucket) == []


def test_s3_client_defaults_sign_no_payload_unless_told() -> None:
    """Uploads are not SHA-256-hashed for the signature (botocore's own choice over https, ours over http);
    a pipeline's config_kwargs still decide."""
    options = storage.with_client_defaults("s3", {"config_kwargs": {"read_timeout": 9}})
    assert options["config_kwargs"] == {"read_timeout": 9, "s3": {"payload_signing_enabled": False}}
    mine = {"config_kwargs": {"s3": {"payload_signing_enabled": True, "addressing_style": "path"}}}
    assert storage.with_client_defaults("s3", mine)["config_kwargs"]["s3"] == mine["config_kwargs"]["s3"]
    assert storage.with_client_defaults("gs", {"token": "anon"}) == {"token": "anon"}


def test_spool_and_publish(store: Store, tmp_path: Path) -> None:
    with store.spool("s/00000.parquet", spool_dir=str(tmp_path / "spool")) as path:
        path.write_bytes(b"parquet bytes")
    assert store.read_bytes("s/00000.parquet") == b"parquet bytes"
    with pytest.raises(KeyError):
        with store.spool("s/00001.parquet", spool_dir=str(tmp_path / "spool")) as path:
            path.write_bytes(b"half")
            raise KeyError("stop")
    assert not store.exists("s/00001.parquet")
    spool = tmp_path / "spool"  # object stores spool there (local stores beside the final name)
    assert not spool.exists() or not any(spool.iterdir())  # nothing left on local disk either
    assert store.list_files("s") == ["s/00000.parquet"]
    source = tmp_path / "done.bin"
    source.write_bytes(b"z" * 5000)
    store.publish_file(source, "s/done.bin", move=True)
    assert store.read_bytes("s/done.bin") == b"z" * 5000 and not source.exists()


def test_remove_leftovers_takes_only_owned_temporaries(store: Store) -> None:
    store.write_bytes("w/00000.tar", b"final")
    for name in (".00000.tar.123.mmprep-tmp", ".00000.tar.manifest.json.9.mmprep-tmp", ".00001.tar.77.mmprep-tmp"):
        store.write_bytes(f"w/{name}", b"partial")
    assert store.remove_leftovers("w", outputs=["00000.tar"]) == 2
    assert store.exists("w/.00001.tar.77.mmprep-tmp")  # another task's
    assert store.remove_leftovers("w") == 1
    assert store.read_bytes("w/00000.tar") == b"final"
    assert store.remove_leftovers("nothing-here") == 0


def test_killed_multipart_writer_leaves_no_object_and_its_upload_is_removed(
        s3_server: SeaweedS3, s3_bucket: str) -> None:
    """SIGKILL in the middle of a multipart upload: no object at the final key; remove_leftovers aborts the
    unfinished upload; a rerun then writes the object."""
    url = f"s3://{s3_bucket}/shards"
    script = textwrap.dedent(f"""
        import os, signal
        from airflow_provider_mmprep.storage import Store
        store = Store({url!r}, {s3_server.storage_options!r})
        with store.open_write("00000.tar", part_size=5 * 2**20) as handle:
            handle.write(b"a" * (11 * 2**20))  # two parts uploaded
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()},
                          capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    store = Store(url, s3_server.storage_options)
    assert not store.exists("00000.tar") and store.list_files() == []
    uploads = store.fs.list_multipart_uploads(s3_bucket)
    assert [u["Key"] for u in uploads] == ["shards/00000.tar"]
    assert store.remove_leftovers("", outputs=["00001.tar"]) == 0  # not this task's
    assert store.remove_leftovers("", outputs=["00000.tar"]) == 1
    assert store.fs.list_multipart_uploads(s3_bucket) == []
    store.write_bytes("00000.tar", b"rerun")
    assert store.read_bytes("00000.tar") == b"rerun"


def test_wrong_credentials_and_missing_bucket_give_one_line_naming_the_url(
        s3_server: SeaweedS3, s3_bucket: str) -> None:
    wrong = {**s3_server.storage_options, "secret": "not-the-secret"}
    url = f"s3://{s3_bucket}/data"
    for action in (lambda s: s.check(), lambda s: s.list_files(), lambda s: s.write_bytes("x", b"1"),
                   lambda s: s.read_bytes("x")):
        with pytest.raises(StorageError) as info:
            action(Store(url, wrong))
        message = str(info.value)
        assert message.startswith(url) and "access denied" in message and "\n" not in message
    missing = "s3://no-such-bucket-here/data"
    for action in (lambda s: s.check(), lambda s: s.list_files(), lambda s: s.write_bytes("x", b"1")):
        with pytest.raises(StorageError) as info:
            action(Store(missing, s3_server.storage_options))
        assert str(info.value).startswith(missing) and "bucket" in str(info.value) and "\n" not in str(info.value)
    Store(url, s3_server.storage_options).check()  # the right ones pass


def test_credentials_from_the_environment(s3_env: SeaweedS3, s3_bucket: str) -> None:
    """No storage_options: the standard AWS variables reach the client (the pod-secret route)."""
    store = Store(f"s3://{s3_bucket}/env")
    store.write_bytes("a.txt", b"hello")
    assert Store(f"s3://{s3_bucket}/env/").read_bytes("a.txt") == b"hello"
    referenced = {"key": "${env:AWS_ACCESS_KEY_ID}", "secret": "${env:AWS_SECRET_ACCESS_KEY}",
                  "endpoint_url": "${env:AWS_ENDPOINT_URL}"}
    assert Store(f"s3://{s3_bucket}/env", referenced).read_bytes("a.txt") == b"hello"
