"""Test helpers the worker imports by name: a custom DCP stream extension and a commit fault.

``XorExtension`` is a StreamTransformExtension of our own (the role PyTorch's tests give their
Rot13 example): every byte is XOR-ed with a key, in chunks. ``tests.dcp._ext`` is also a worker
plug-in (``worker_options={"preload": ["tests.dcp._ext"]}``): in a worker it makes the DCP commit
of any checkpoint whose name contains ``fail-commit`` fail with ENOSPC, as a full disk would.
"""

from __future__ import annotations

import errno
import io
import os
from typing import IO, Any

from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

KEY = 0x5A


def _xor(b: Any) -> bytes:
    return bytes(x ^ KEY for x in bytes(b))


class _XorWriter(io.RawIOBase):
    def __init__(self, out: IO[bytes]) -> None:
        super().__init__()
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(memoryview(b).cast("B"))
        self.out.write(_xor(data))
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.out.flush()
            self.out.close()
        super().close()


class _XorReader(io.RawIOBase):
    def __init__(self, src: IO[bytes]) -> None:
        super().__init__()
        self.src = src

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self.src.read(len(view))
        view[: len(data)] = _xor(data)
        return len(data)


class XorExtension(StreamTransformExtension):
    @staticmethod
    def registry_name() -> str:
        return "stream.test-xor"

    @staticmethod
    def from_descriptor(version: str) -> XorExtension:
        if version != "1":
            raise ValueError(f"unknown version {version}")
        return XorExtension()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return _XorWriter(output)  # type: ignore[return-value]

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return io.BufferedReader(_XorReader(input))  # type: ignore[return-value]


def registry() -> ExtensionRegistry:
    reg = ExtensionRegistry()
    reg.register(XorExtension)
    return reg


def _install_commit_fault() -> None:
    from asyncckpt.dcp import _commit

    real = _commit.commit_dcp

    async def commit_dcp(storage: Any, name: str, metadata: Any, **kw: Any) -> Any:
        if "fail-commit" in name:
            raise OSError(errno.ENOSPC, f"No space left on device (injected): {name}/.metadata")
        return await real(storage, name, metadata, **kw)

    _commit.commit_dcp = commit_dcp  # type: ignore[assignment]


if os.environ.get("ASYNCCKPT_ROLE") == "worker":
    _install_commit_fault()
