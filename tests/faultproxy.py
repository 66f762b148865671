"""An asyncio TCP proxy on 127.0.0.1 that injects object-store faults (S3, GCS, Azure Blob), for tests.

It runs its own event loop on a daemon thread, so synchronous and async tests alike can
switch faults on between (or during) requests. It parses HTTP/1.1 just enough (request
line, headers, Content-Length / chunked framing) to pick out single requests and responses;
both directions are pumped at once, so ``Expect: 100-continue`` works.

Faults, each for the next ``count`` requests whose ``"METHOD target"`` matches the regex
``match`` (every request when None):

- `error`: answer ``status`` with an XML error body ``<Error><Code>code</Code>...`` (the shape
  S3 and Azure Blob use; GCS clients go by the status) without forwarding the request;
- `reset_request`: forward ``after`` bytes of the request body, then reset both connections;
- `reset_response`: forward ``after`` bytes of the response body, then reset both connections;
- `cut_response`: forward ``after`` bytes of the response body, then close cleanly (FIN)
  although Content-Length promised more;
- `stall`: read the request head, then never answer for ``seconds`` (then reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["FaultProxy"]

_HEAD_LIMIT = 64 * 1024
_COPY = 256 * 1024
_REASONS = {500: "Internal Server Error", 503: "Slow Down", 502: "Bad Gateway", 429: "Too Many Requests"}


@dataclass
class _Fault:
    kind: str  # error | reset_request | reset_response | cut_response | stall
    remaining: int
    pattern: re.Pattern[str] | None
    status: int = 503
    code: str = "SlowDown"
    after: int = 0
    seconds: float = 0.0


@dataclass
class _Request:
    method: str
    target: str
    fault: _Fault | None


class _Killed(Exception):
    """The proxy cut this connection on purpose."""


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return lines[0], headers


def _framing(headers: dict[str, str]) -> tuple[str, int]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return "chunked", 0
    if "content-length" in headers:
        return "length", int(headers["content-length"])
    return "none", 0


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()


class FaultProxy:
    """A loopback TCP proxy in front of one HTTP object-store endpoint, with switchable faults."""

    def __init__(self, upstream_url: str, *, max_connections: int = 256) -> None:
        parts = urlsplit(upstream_url)
        host = parts.hostname or ""
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"FaultProxy only proxies loopback endpoints, not {upstream_url!r}")
        self.upstream = (host, parts.port or 80)
        self.max_connections = max_connections
        self.port = 0
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self.seen: list[tuple[str, dict[str, str]]] = []  # ("METHOD target", headers) of every request
        self.injected: Counter[str] = Counter()  # faults applied, by kind
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start_server(), loop)
        fut.result(10)
        return self

    async def _start_server(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=_HEAD_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._conns):
                t.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    @staticmethod
    def _compile(match: str | None) -> re.Pattern[str] | None:
        return re.compile(match) if match else None

    def error(self, count: int = 1, *, status: int = 503, code: str = "SlowDown", match: str | None = None) -> None:
        """Answer the next ``count`` matching requests with ``status`` and an S3 XML error."""
        self._add(_Fault("error", count, self._compile(match), status=status, code=code))

    def reset_request(self, after: int, count: int = 1, *, match: str | None = None) -> None:
        """Reset the connection after forwarding ``after`` bytes of a matching request's body."""
        self._add(_Fault("reset_request", count, self._compile(match), after=after))

    def reset_response(self, after: int, count: int = 1, *, match: str | None = None) -> None:
        """Reset the connection after forwarding ``after`` bytes of a matching response's body."""
        self._add(_Fault("reset_response", count, self._compile(match), after=after))

    def cut_response(self, after: int, count: int = 1, *, match: str | None = None) -> None:
        """Close cleanly after ``after`` bytes of a matching response's body (short of Content-Length)."""
        self._add(_Fault("cut_response", count, self._compile(match), after=after))

    def stall(self, seconds: float, count: int = 1, *, match: str | None = None) -> None:
        """Accept matching requests and never answer them for ``seconds``."""
        self._add(_Fault("stall", count, self._compile(match), seconds=seconds))

    def clear(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._faults.clear()

    def pending(self) -> int:
        """How many fault applications are still armed."""
        with self._lock:
            return sum(f.remaining for f in self._faults)

    @property
    def requests(self) -> list[str]:
        """``"METHOD target"`` of every request seen so far."""
        with self._lock:
            return [line for line, _ in self.seen]

    def _take(self, method: str, target: str, headers: dict[str, str]) -> _Fault | None:
        line = f"{method} {target}"
        with self._lock:
            self.seen.append((line, headers))
            for f in self._faults:
                if f.pattern is None or f.pattern.search(line):
                    f.remaining -= 1
                    if f.remaining <= 0:
                        self._faults.remove(f)
                    self.injected[f.kind] += 1
                    return f
        return None

    # ------------------------------------------------------------------ proxying

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.max_connections:
            _reset(cwriter)
            return
        self._conns.add(task)
        uwriter: asyncio.StreamWriter | None = None
        try:
            try:
                ureader, uwriter = await asyncio.open_connection(*self.upstream, limit=_HEAD_LIMIT)
            except OSError:
                _reset(cwriter)  # upstream down: look like it to the client
                return
            queue: asyncio.Queue[_Request] = asyncio.Queue()
            requests = asyncio.ensure_future(self._pump_requests(creader, uwriter, cwriter, queue))
            responses = asyncio.ensure_future(self._pump_responses(ureader, cwriter, uwriter, queue))
            try:
                done, _ = await asyncio.wait([requests, responses], return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()  # raises _Killed / connection errors
                if requests in done:
                    # The client stopped sending: let the last response through, then close.
                    await asyncio.wait_for(responses, 60)
                # else: upstream closed (Connection: close): close the client side too.
            finally:
                for t in (requests, responses):
                    t.cancel()
                await asyncio.gather(requests, responses, return_exceptions=True)
        except (_Killed, asyncio.CancelledError):
            pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            _reset(cwriter)
            _reset(uwriter)
        finally:
            _close(cwriter)
            _close(uwriter)
            self._conns.discard(task)

    async def _pump_requests(
        self,
        creader: asyncio.StreamReader,
        uwriter: asyncio.StreamWriter,
        cwriter: asyncio.StreamWriter,
        queue: asyncio.Queue[_Request],
    ) -> None:
        while True:
            try:
                head = await creader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                with contextlib.suppress(OSError):
                    if uwriter.can_write_eof():
                        uwriter.write_eof()  # the client is done sending: half-close upstream
                return
            line, headers = _parse_head(head)
            method, target = [*line.split(" "), "", ""][:2]
            fault = self._take(method, target, headers)
            kind = fault.kind if fault else ""
            framing = _framing(headers)
            if kind == "error":
                assert fault is not None
                if headers.get("expect", "").lower() != "100-continue":
                    await self._forward_body(creader, None, framing)  # swallow the body
                body = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    f"<Error><Code>{fault.code}</Code><Message>injected by the test fault proxy</Message>"
                    f"<Resource>{target.split('?')[0]}</Resource><RequestId>faultproxy</RequestId></Error>"
                ).encode()
                if method == "HEAD":
                    body = b""
                cwriter.write(
                    f"HTTP/1.1 {fault.status} {_REASONS.get(fault.status, 'Error')}\r\n"
                    f"Content-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                    "x-amz-request-id: faultproxy\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await cwriter.drain()
                _close(cwriter)
                _reset(uwriter)
                raise _Killed
            if kind == "stall":
                assert fault is not None
                await asyncio.sleep(fault.seconds)
                _reset(cwriter)
                _reset(uwriter)
                raise _Killed
            await queue.put(_Request(method, target, fault))
            uwriter.write(head)
            limit = fault.after if kind == "reset_request" else None
            cut = await self._forward_body(creader, uwriter, framing, limit)
            if cut:
                _reset(uwriter)
                _reset(cwriter)
                raise _Killed
            await uwriter.drain()

    async def _pump_responses(
        self,
        ureader: asyncio.StreamReader,
        cwriter: asyncio.StreamWriter,
        uwriter: asyncio.StreamWriter,
        queue: asyncio.Queue[_Request],
    ) -> None:
        while True:
            try:
                head = await ureader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # upstream closed: _handle closes the client
            line, headers = _parse_head(head)
            status = int(line.split(" ")[1])
            if 100 <= status < 200:
                cwriter.write(head)  # 100 Continue and friends: no body, no request consumed
                await cwriter.drain()
                continue
            req = await asyncio.wait_for(queue.get(), 30)
            framing = _framing(headers)
            if req.method == "HEAD" or status in (204, 304):
                framing = ("length", 0)
            elif framing[0] == "none":
                framing = ("eof", 0)
            kind = req.fault.kind if req.fault else ""
            cwriter.write(head)
            limit = req.fault.after if req.fault and kind in ("reset_response", "cut_response") else None
            cut = await self._forward_body(ureader, cwriter, framing, limit)
            if cut:
                if kind == "cut_response":
                    await cwriter.drain()
                    _close(cwriter)  # FIN: the client sees a body shorter than Content-Length
                    _reset(uwriter)
                else:
                    _reset(cwriter)
                    _reset(uwriter)
                raise _Killed
            await cwriter.drain()
            if headers.get("connection", "").lower() == "close" or framing[0] == "eof":
                return

    @staticmethod
    async def _forward_body(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter | None,
        framing: tuple[str, int],
        limit: int | None = None,
    ) -> bool:
        """Copy one body (dropping it when ``writer`` is None); True if stopped at ``limit`` bytes."""
        sent = 0

        async def emit(data: bytes) -> bool:
            nonlocal sent
            if limit is not None and sent + len(data) >= limit:
                data = data[: max(0, limit - sent)]
                if writer is not None and data:
                    writer.write(data)
                    await writer.drain()
                sent += len(data)
                return True
            if writer is not None:
                writer.write(data)
                if writer.transport.get_write_buffer_size() > _COPY:
                    await writer.drain()
            sent += len(data)
            return False

        kind, length = framing
        if kind == "length":
            left = length
            while left > 0:
                data = await reader.read(min(_COPY, left))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                if await emit(data):
                    return True
            return limit is not None and limit <= 0 and length > 0
        if kind == "eof":
            while data := await reader.read(_COPY):
                if await emit(data):
                    return True
            return False
        if kind == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                if await emit(size_line):
                    return True
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, up to the empty line
                        trailer = await reader.readuntil(b"\r\n")
                        if await emit(trailer):
                            return True
                        if trailer == b"\r\n":
                            return False
                left = size + 2
                while left > 0:
                    data = await reader.read(min(_COPY, left))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    if await emit(data):
                        return True
        return False
