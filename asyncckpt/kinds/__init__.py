"""A handler per checkpoint kind (see :mod:`.base` for the seam and its call order).

* :mod:`.native`: ``"asyncckpt"``, the native format;
* :mod:`.dcp`: ``"dcp"``, asyncckpt's DCP writer;
* :mod:`.torch_file`: ``"torch.save"``, a local file written by ``torch.save``.
"""

from .base import (
    CheckpointKind,
    FileKind,
    GenerationFiles,
    RecordProbe,
    VerifyReport,
    kind_named,
    kind_of,
    kind_of_file,
    kinds,
    register_kind,
    unregister_kind,
)

__all__ = [
    "CheckpointKind",
    "FileKind",
    "GenerationFiles",
    "RecordProbe",
    "VerifyReport",
    "kind_named",
    "kind_of",
    "kind_of_file",
    "kinds",
    "register_kind",
    "unregister_kind",
]
