"""Random number generator state (Python, NumPy, torch CPU and CUDA) and a resumable sampler.

:func:`get_rng_state` returns a value asyncckpt stores without pickle (tensors, arrays, plain
values); :func:`set_rng_state` puts it back. :class:`ResumableSampler` is a shuffling sampler
whose position in the epoch is part of its ``state_dict()``, so a resumed run sees exactly the
batches the interrupted one would have seen.
"""

from __future__ import annotations

import array
import logging
import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch

from .errors import BadInputError

__all__ = ["ResumableSampler", "get_rng_state", "set_rng_state"]

log = logging.getLogger("asyncckpt")


def get_rng_state(*, cuda: bool = True) -> dict[str, Any]:
    """The state of Python's ``random``, NumPy's global generator, torch CPU and every CUDA device."""
    version, internal, gauss_next = random.getstate()
    # NumPy's get_state copies its key one item at a time (~32 µs). Reading the generator's memory
    # instead cannot see np.random.set_state() put back a cached Gaussian at the same key and
    # position, so it is not done.
    np_state = np.random.get_state(legacy=False)
    if not isinstance(np_state, dict):  # pragma: no cover - NumPy's global is MT19937 unless replaced
        raise BadInputError("NumPy's global generator is not MT19937; its state cannot be saved")
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": _python_words(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


_last_python: tuple[tuple[int, ...], np.ndarray] | None = None


def _python_words(internal: tuple[int, ...]) -> np.ndarray:
    """``random``'s 625 state words as a uint64 array; the last one again when they are the same."""
    global _last_python
    last = _last_python
    if last is not None and last[0] == internal:
        return last[1]
    words = np.frombuffer(array.array("Q", internal), dtype=np.uint64)
    words.flags.writeable = False  # the same array may be handed out again
    _last_python = (internal, words)
    return words


def set_rng_state(state: dict[str, Any], *, cuda: bool = True) -> None:
    """Restore what :func:`get_rng_state` returned (as saved and loaded by asyncckpt)."""
    try:
        py = state["python"]
        internal = tuple(int(x) for x in np.asarray(py["state"]).tolist())
        gauss = py["gauss_next"]
        random.setstate((int(py["version"]), internal, None if gauss is None else float(gauss)))
        n = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": n["bit_generator"],
                "state": {"key": np.ascontiguousarray(n["key"], dtype=np.uint32), "pos": int(n["pos"])},
                "has_gauss": int(n["has_gauss"]),
                "gauss": float(n["gauss"]),
            }
        )
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).clone())
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"the saved RNG state is malformed ({type(exc).__name__}: {exc}); restore with rng=False") from exc
    saved_cuda = state.get("cuda")
    if not cuda or not saved_cuda:
        return
    if not torch.cuda.is_available():
        log.warning("the checkpoint holds CUDA RNG state for %d device(s), but CUDA is not available; not restored",
                    len(saved_cuda), extra={"op": "restore", "rank": None, "step": None, "bytes": None, "seconds": None})
        return
    count = torch.cuda.device_count()
    if count != len(saved_cuda):
        log.warning("the checkpoint holds CUDA RNG state for %d device(s), this process sees %d; restoring the first %d",
                    len(saved_cuda), count, min(count, len(saved_cuda)),
                    extra={"op": "restore", "rank": None, "step": None, "bytes": None, "seconds": None})
    for i, s in enumerate(saved_cuda[:count]):
        torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).clone(), device=i)


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A (shuffling) sampler whose position survives a restart: put it in the manager's state.

    Epoch ``e`` visits a permutation drawn from its own generator seeded with ``(seed, e)``, so
    the order never depends on the global RNG. ``state_dict()`` holds the epoch and how many
    indices of it were handed out; after ``load_state_dict`` the next iteration continues from
    there. With ``DataLoader(num_workers=0)`` that count is exactly the samples consumed; with
    workers, prefetched batches count as consumed (they are skipped on resume).

    Give the DataLoader its own ``generator=torch.Generator()`` too: otherwise creating a
    DataLoader iterator draws a seed from torch's global RNG, which a resumed run (that creates
    its iterator mid-epoch) would do at a different point than the uninterrupted one.
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.n = int(data_source) if isinstance(data_source, int) else len(data_source)
        if self.n < 0:
            raise BadInputError(f"ResumableSampler needs a non-negative size, got {self.n}")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.index = 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order(self.epoch)
        while self.index < self.n:
            i = order[self.index]
            self.index += 1
            yield i
        self.epoch += 1
        self.index = 0

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": self.n, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise BadInputError(
                f"ResumableSampler: the checkpoint was taken over {state['n']} samples, this sampler has {self.n}; "
                "the data set changed, so the saved position means nothing here"
            )
        if not 0 <= int(state["index"]) <= self.n:
            raise BadInputError(f"ResumableSampler: saved index {state['index']} is outside 0..{self.n}")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
