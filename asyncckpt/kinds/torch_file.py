"""Kind ``"torch.save"``: one local file written by ``torch.save`` (or :class:`~asyncckpt.TorchAsyncCheckpoint`).

No COMMIT record: the file is found by its first bytes (a zip archive holding ``data.pkl``, or the
legacy pickle magic). It is read with ``torch.load(weights_only=True)`` unless the caller allows
unpickling; a zip file's records carry CRC-32s, which :meth:`TorchSaveKind.verify_file` checks.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import IntegrityError
from ..locate import torch_save_format
from .base import FileKind, VerifyReport, register_kind

__all__ = ["TorchSaveKind"]


class TorchSaveKind(FileKind):
    name: ClassVar[str] = "torch.save"
    reader: ClassVar[str] = "torch.load(path, weights_only=True) reads it"

    def detect_file(self, path: Path) -> str | None:
        return torch_save_format(path)

    def load_file(self, path: Path, variant: str, *, allow_pickle: bool = False) -> Any:
        """``torch.load`` of the file: ``weights_only=True`` (no arbitrary unpickling) unless ``allow_pickle``,
        memory-mapped when the format allows; IntegrityError naming the file when torch cannot read it."""
        try:
            return torch.load(path, weights_only=not allow_pickle, map_location="cpu", mmap=variant == "zip")
        except Exception as exc:  # torch raises many kinds; each becomes one clear error
            raise IntegrityError(
                f"{path}: torch.load(path, weights_only={not allow_pickle}) cannot read it: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc

    def verify_file(self, path: Path, variant: str) -> VerifyReport:
        report = VerifyReport(files=1)
        records = 0
        if variant == "zip":
            try:
                with zipfile.ZipFile(path) as z:
                    records = len(z.infolist())
                    bad = z.testzip()  # reads every record and checks its CRC-32
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
                report.problems.append(f"{path}: a torch.save (zip) file whose archive cannot be read: {exc}")
                return report
            if bad is not None:
                report.problems.append(f"{path}: a torch.save (zip) file; record {bad!r} fails its CRC-32 (the bytes "
                                       "changed after torch.save wrote them)")
                return report
            report.checked = path.stat().st_size
        try:
            self.load_file(path, variant)
        except IntegrityError as exc:
            report.problems.append(str(exc))
            return report
        checked = (f"{records} records, every CRC-32 matches, " if variant == "zip"
                   else "legacy format, which holds no checksums to check; ")
        report.summary = (f"a torch.save file ({variant}, {path.stat().st_size} bytes): {checked}"
                          "torch.load(path, weights_only=True) reads it")
        return report


TORCH_SAVE = register_kind(TorchSaveKind())
