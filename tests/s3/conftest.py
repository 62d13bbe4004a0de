"""A real S3 server (SeaweedFS on loopback) for the object-storage tests: one per session, a bucket per test."""

from __future__ import annotations

import itertools
from typing import Iterator

import pytest

from airflow_provider_mmprep.testing.s3_server import SeaweedS3

_bucket_numbers = itertools.count()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> str:
    """A fresh, empty bucket's name (tests never see each other's objects)."""
    name = f"test-{next(_bucket_numbers):04d}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    """The server's credentials and endpoint in the standard AWS environment variables.

    s3fs caches clients by their arguments, not by the environment they read: the cache is cleared on both
    sides so a test that changes the variables (wrong credentials) leaves no client behind that uses them."""
    import s3fs

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
