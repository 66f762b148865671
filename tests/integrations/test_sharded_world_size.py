"""AsyncckptModelParallelStrategy resumed by another number of ranks: weights and metadata load, RNG state is left alone.

One process, no process group (Lightning's single-rank case): a checkpoint saved by the strategy
itself (one rank), and the same tensors rewritten with stock ``dcp.save`` as if two ranks had saved
(an RNG entry per rank), are loaded by ``load_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from .conftest import assert_same

pytest.importorskip("lightning", reason="lightning is not installed (pip install 'asyncckpt[lightning]')")

import lightning as L
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from asyncckpt.integrations.lightning import AsyncckptModelParallelStrategy
from asyncckpt.integrations.sharded import META_KEY, rng_key


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 4)


def strategy_for(module: Tiny) -> AsyncckptModelParallelStrategy:
    strategy = AsyncckptModelParallelStrategy()
    strategy.connect(module)
    strategy.optimizers = []
    return strategy


def test_other_world_size_loads_weights_and_skips_rng(tmp_path: Path) -> None:
    module = Tiny()
    saved = {k: v.clone() for k, v in get_model_state_dict(module).items()}
    strategy = strategy_for(module)
    one_rank = tmp_path / "one-rank"
    try:
        torch.manual_seed(5)
        strategy.save_checkpoint({"state_dict": get_model_state_dict(module), "epoch": 3}, one_rank)
        after_seed = torch.rand(4)  # what a restored RNG state draws next
    finally:
        strategy.asyncckpt_close()  # finishes the save (the stock teardown wants a cluster environment)
    entries = dcp.FileSystemReader(str(one_rank)).read_metadata().state_dict_metadata
    assert set(k for k in entries if k.startswith("asyncckpt")) == {META_KEY, rng_key(0)}

    # The same checkpoint as two ranks would have written it: an RNG entry for each.
    raw = {META_KEY: torch.empty(entries[META_KEY].size, dtype=torch.uint8),
           rng_key(0): torch.empty(entries[rng_key(0)].size, dtype=torch.uint8),
           "state_dict": {k: torch.empty_like(v) for k, v in saved.items()}}
    dcp.load(raw, checkpoint_id=str(one_rank), no_dist=True)
    two_ranks = tmp_path / "two-ranks"
    dcp.save({**raw, rng_key(1): raw[rng_key(0)].clone()}, checkpoint_id=str(two_ranks), no_dist=True)

    for path, restores_rng in ((two_ranks, False), (one_rank, True)):
        with torch.no_grad():
            for p in module.parameters():
                p.zero_()
        torch.manual_seed(77)
        untouched = torch.get_rng_state()
        meta = strategy_for(module).load_checkpoint(path)
        assert meta == {"epoch": 3}
        assert_same(get_model_state_dict(module), saved, f"weights from {path.name}")
        if restores_rng:
            assert torch.equal(torch.rand(4), after_seed)
        else:  # saved by 2 ranks, 1 runs: no rank's state is put back
            assert torch.equal(torch.get_rng_state(), untouched)
