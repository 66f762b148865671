"""Snapshot modes: when ``save`` may return before the worker holds its copy of the state.

One policy object per saver (:class:`~asyncckpt.AsyncCheckpointer`,
:class:`~asyncckpt.TorchAsyncCheckpoint`, the DCP path), with one meaning everywhere:

* ``"blocking"``: ``save`` returns once the snapshot is taken; the caller may mutate right after
  (nvidia-resiliency-ext's contract).
* ``"lazy"``: ``save`` returns at once; the hooks of attached optimizers/modules wait for the
  snapshot before they mutate, and a :class:`~asyncckpt.staging.SnapshotGuard` fails the save with
  :class:`~asyncckpt.TornSnapshotError` if anything else changed a tensor in place meanwhile.
* ``"auto"`` (default): lazy when every tensor being saved belongs to an attached optimizer or
  module, blocking otherwise; after a torn snapshot it switches to blocking, with a warning.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

from .errors import BadInputError

__all__ = ["MODES", "SnapshotMode", "SnapshotPolicy", "check_snapshot_mode", "unwrap_optimizer"]

log = logging.getLogger("asyncckpt")

SnapshotMode = Literal["auto", "blocking", "lazy"]
MODES = ("auto", "blocking", "lazy")


def check_snapshot_mode(mode: str) -> str:
    if mode not in MODES:
        raise BadInputError(f"snapshot must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode


def unwrap_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework wrapper (Accelerate's, Lightning's, ...).

    A wrapper may itself subclass ``torch.optim.Optimizer`` (Accelerate's ``AcceleratedOptimizer``)
    without running its step hooks: the innermost optimizer (``.optimizer`` / ``._optimizer``) is the
    one whose ``step`` really changes the state.
    """
    for _ in range(8):
        inner = getattr(opt, "optimizer", None)
        if inner is None or inner is opt:
            inner = getattr(opt, "_optimizer", None)
        if inner is None or inner is opt or not (isinstance(inner, torch.optim.Optimizer) or hasattr(inner, "optimizer")):
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer) or not hasattr(opt, "register_step_pre_hook"):
        raise BadInputError(
            f"cannot attach {type(opt).__module__}.{type(opt).__qualname__}: it is not a torch.optim.Optimizer "
            "(nor a wrapper with .optimizer); pass the optimizer whose step() changes the state"
        )
    return opt


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class SnapshotPolicy:
    """Hooks that wait for the snapshot, and the decision ``blocking`` vs ``lazy`` for each save.

    ``wait`` is what the hooks call (the saver's ``wait_snapshot``); it is held weakly through
    the owner so that a forgotten saver does not stay alive through an optimizer's hook.
    """

    def __init__(self, mode: str, owner: Any, wait: Callable[[Any], None]) -> None:
        self.mode = check_snapshot_mode(mode)
        self._owner = weakref.ref(owner)
        self._wait = wait
        self._hooks: list[Any] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.modules: list[torch.nn.Module] = []
        self._covered: set[int] | None = None
        self.forced_blocking = False
        self.torn = 0

    @property
    def attached(self) -> bool:
        return bool(self.optimizers or self.modules)

    def attach(self, optimizers: Any = None, modules: torch.nn.Module | Iterable[torch.nn.Module] | None = None) -> None:
        """Hook ``optimizer.step()`` and ``module`` forward so they wait for the snapshot."""
        if optimizers is not None and not isinstance(optimizers, (list, tuple, set)):
            optimizers = [optimizers]
        mods = [modules] if isinstance(modules, torch.nn.Module) else list(modules or ())
        owner_ref, wait = self._owner, self._wait

        def hook(*_a: Any, **_k: Any) -> None:
            owner = owner_ref()
            if owner is not None:
                wait(owner)

        for opt in optimizers or ():
            inner = unwrap_optimizer(opt)
            if any(o is inner for o in self.optimizers):
                continue
            self.optimizers.append(inner)
            self._hooks.append(inner.register_step_pre_hook(hook))
        for m in mods:
            if not isinstance(m, torch.nn.Module):
                raise BadInputError(f"cannot attach {type(m).__qualname__}: modules must be torch.nn.Module")
            if any(x is m for x in self.modules):
                continue
            self.modules.append(m)
            self._hooks.append(m.register_forward_pre_hook(hook))
        self._covered = None

    def storages_moved(self) -> None:
        """Tensors were moved to shared memory (their storage addresses changed)."""
        self._covered = None

    def _covered_ptrs(self) -> set[int]:
        if self._covered is None:
            ptrs: set[int] = set()
            for opt in self.optimizers:
                for group in opt.param_groups:
                    ptrs.update(_storage_ptr(p) for p in group["params"])
                for st in opt.state.values():
                    ptrs.update(_storage_ptr(v) for v in st.values() if isinstance(v, torch.Tensor))
            for m in self.modules:
                ptrs.update(_storage_ptr(t) for t in m.parameters())
                ptrs.update(_storage_ptr(t) for t in m.buffers())
            self._covered = ptrs
        return self._covered

    def decide(self, tensors: Iterable[torch.Tensor], asked: str | None = None) -> Literal["blocking", "lazy"]:
        """``"blocking"`` or ``"lazy"`` for a save of ``tensors`` (those the worker copies)."""
        mode = check_snapshot_mode(asked) if asked is not None else self.mode
        tensors = list(tensors)
        if not tensors:
            return "lazy"  # everything was copied at save(): nothing can tear
        if mode != "auto":
            return mode  # type: ignore[return-value]
        if self.forced_blocking or not self.attached:
            return "blocking"
        if all(_storage_ptr(t) in self._covered_ptrs() for t in tensors):
            return "lazy"
        self._covered = None  # the optimizer may have created state since: look again
        return "lazy" if all(_storage_ptr(t) in self._covered_ptrs() for t in tensors) else "blocking"

    def on_torn(self, what: str, keys: list[str]) -> None:
        """Called when the guard fired for a save of ``what``."""
        self.torn += 1
        if self.mode == "auto" and not self.forced_blocking:
            self.forced_blocking = True
            log.warning(
                "asyncckpt: the state changed in place before the snapshot of %s was taken (%s); that save is "
                "not committed. From now on save() waits for the snapshot (as with snapshot='blocking'). Attach "
                "the optimizer/module that makes the change, or call wait_snapshot() before it, to keep saves lazy.",
                what, ", ".join(keys[:5]),
            )

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
