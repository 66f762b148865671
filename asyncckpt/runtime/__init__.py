"""The worker runtime: typed frames, the worker process, its lanes, and the two seams plugged into it.

- :mod:`~asyncckpt.runtime.messages`: frames (a msgpack header with the request index, then an
  opaque payload) and how errors travel.
- :mod:`~asyncckpt.runtime.client`: the worker seen from the trainer (launch, send, receive).
- :mod:`~asyncckpt.runtime.server`: the worker process (snapshot stage, write stage, control lane).
- :mod:`~asyncckpt.runtime.context`: :class:`WorkerContext`, the worker's state between requests.
- :mod:`~asyncckpt.runtime.protocol`: the :class:`Sink` (and :class:`CopyAwareSink`) and :class:`ControlOp` seams.
"""

from __future__ import annotations

from .protocol import CallPayload, ControlOp, ControlPayload, CopyAwareSink, SavePayload, Sink

__all__ = ["CallPayload", "ControlOp", "ControlPayload", "CopyAwareSink", "SavePayload", "Sink"]
