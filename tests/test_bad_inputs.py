"""Every bad input gets a clear error before anything is written."""

from __future__ import annotations

import os
import types

import pytest
import torch

import asyncckpt


def _nothing_written(root):
    return not os.path.exists(root) or os.listdir(root) == []


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"x": object()}, r"x: value of type builtins.object is not supported"),
        ({"s": torch.eye(3).to_sparse()}, "s: sparse tensors"),
        ({"n": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, "n: nested tensors"),
        ({("a", 1): torch.ones(1)}, "dict key \\('a', 1\\) of type tuple"),
        ({1.5: 1}, "dict key 1.5 of type float"),
        ({"a\udc80": torch.ones(1)}, "not valid Unicode"),
        ({1 << 64: 1}, "does not fit in 64 bits"),
        ({True: 1}, "of type bool"),
        ({"m": torch.empty(3, device="meta")}, "meta tensors"),
        ({"f": lambda: 1}, "not supported"),
        ([torch.ones(1)], "must be a mapping"),
    ],
)
def test_unsupported_state_is_refused_before_writing(shared_ckpt, tmp_path, state, match):
    with pytest.raises(asyncckpt.BadInputError, match=match):
        shared_ckpt.save(state, tmp_path / "root" / "c")
    assert _nothing_written(tmp_path / "root")
    assert shared_ckpt.in_flight == 0


def test_cycle_is_refused(shared_ckpt, tmp_path):
    d: dict = {"a": 1}
    d["self"] = d
    with pytest.raises(asyncckpt.BadInputError, match="cycle"):
        shared_ckpt.save(d, tmp_path / "c")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_destination_non_root(shared_ckpt, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(asyncckpt.BadInputError, match="not writable"):
            shared_ckpt.save({"w": torch.ones(1)}, ro / "c")
    finally:
        ro.chmod(0o700)


def test_destination_under_a_file(shared_ckpt, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(asyncckpt.BadInputError, match="not a directory"):
        shared_ckpt.save({"w": torch.ones(1)}, f / "c")


def test_existing_step_needs_overwrite(shared_ckpt, tmp_path):
    shared_ckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(asyncckpt.CheckpointExistsError, match="already being saved"):
        shared_ckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    with pytest.raises(asyncckpt.CheckpointExistsError, match="overwrite=True"):
        shared_ckpt.save({"w": torch.zeros(2)}, tmp_path / "c")
    assert torch.equal(asyncckpt.load(tmp_path / "c")["w"], torch.ones(2))
    shared_ckpt.save({"w": torch.zeros(2)}, tmp_path / "c", overwrite=True)
    shared_ckpt.finalize(blocking=True)
    assert torch.equal(asyncckpt.load(tmp_path / "c")["w"], torch.zeros(2))


def test_existing_checkpoint_of_another_process_fails_the_save_at_finalize(shared_ckpt, tmp_path):
    shared_ckpt.save({"w": torch.ones(2)}, tmp_path / "c")
    shared_ckpt.finalize(blocking=True)
    with asyncckpt.AsyncCheckpointer() as other:  # knows nothing of "c": its worker checks the storage
        h = other.save({"w": torch.zeros(2 << 20)}, tmp_path / "c")
        with pytest.raises(asyncckpt.CheckpointExistsError, match="overwrite=True"):
            other.finalize(blocking=True)
        assert h.error is not None and not h.committed
    assert torch.equal(asyncckpt.load(tmp_path / "c")["w"], torch.ones(2))


@pytest.mark.parametrize("kwargs", [{"max_in_flight": 0}, {"when_full": "drop"}, {"chunk_size": 1024}])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(asyncckpt.BadInputError):
        asyncckpt.AsyncCheckpointer(start_worker=False, **kwargs)


def test_bad_paths(shared_ckpt, tmp_path):
    with pytest.raises(asyncckpt.BadInputError, match="must end in a name"):
        shared_ckpt.save({"w": 1}, str(tmp_path) + "/..")
    with pytest.raises(asyncckpt.BadInputError, match="unknown storage scheme"):
        shared_ckpt.save({"w": 1}, "ftp://host/x/c")
    with pytest.raises(asyncckpt.CheckpointNotFoundError):
        asyncckpt.load(tmp_path / "nothing-here")


@pytest.mark.parametrize(("metadata", "match"), [
    ({"epoch": 3}, r"metadata\['epoch'\]: keys and values must be str, got str -> int"),
    ({1: "x"}, r"metadata\[1\]: keys and values must be str, got int -> str"),
    ([("a", "b")], "metadata must be a dict of str to str, got list"),
])
def test_metadata_that_a_commit_record_cannot_hold_is_refused_at_save(shared_ckpt, tmp_path, metadata, match):
    # Stored, such a value made a commit record that no reader accepts: the checkpoint was lost.
    with pytest.raises(asyncckpt.BadInputError, match=match):
        shared_ckpt.save({"w": torch.ones(2)}, tmp_path / "c", metadata=metadata)
    assert _nothing_written(tmp_path / "c")
    shared_ckpt.save({"w": torch.ones(2)}, tmp_path / "c", metadata=types.MappingProxyType({"epoch": "3"}))
    shared_ckpt.finalize(blocking=True)
    assert asyncckpt.list_checkpoints(tmp_path)[0].name == "c"  # any mapping of str to str is taken


def test_commit_checkpoint_refuses_metadata_it_could_not_read_back(tmp_path):
    from asyncckpt._loop import run_sync
    from asyncckpt.catalog import commit_checkpoint
    from asyncckpt.storage import open_storage

    with asyncckpt.AsyncCheckpointer() as ck:
        ck.save({"w": torch.ones(2)}, tmp_path / "c")
    storage = open_storage(str(tmp_path))
    with pytest.raises(asyncckpt.BadInputError, match="must be str"):
        run_sync(commit_checkpoint(storage, "c", world_size=1, step=None, overwrite=True, metadata={"a": 1}))  # type: ignore[dict-item]
    assert asyncckpt.list_checkpoints(tmp_path)[0].name == "c"  # the committed checkpoint is intact


@pytest.mark.parametrize("step", [-1, 2.0, True, "3", 1 << 63])
def test_a_step_the_records_cannot_hold_is_refused_at_save(shared_ckpt, tmp_path, step):
    with pytest.raises(asyncckpt.BadInputError, match="step must be a non-negative int below 2\\*\\*63"):
        shared_ckpt.save({"w": torch.ones(2)}, tmp_path / "c", step=step)
    assert _nothing_written(tmp_path / "c")


def test_the_largest_step_the_records_hold_round_trips(shared_ckpt, tmp_path):
    shared_ckpt.save({"w": torch.ones(2)}, tmp_path / "c", step=(1 << 63) - 1)
    shared_ckpt.finalize(blocking=True)
    assert asyncckpt.list_checkpoints(tmp_path)[0].step == (1 << 63) - 1


def test_a_path_that_is_not_text_or_a_retention_that_is_not_a_policy_is_named(shared_ckpt, tmp_path):
    with pytest.raises(asyncckpt.BadInputError, match=r"a checkpoint path must be a str or an os\.PathLike of str, not bytes"):
        shared_ckpt.save({"w": torch.ones(2)}, os.fsencode(tmp_path / "c"))
    with pytest.raises(asyncckpt.BadInputError, match="not int"):
        shared_ckpt.save({"w": torch.ones(2)}, 3)
    with pytest.raises(asyncckpt.BadInputError, match="a checkpoint path must be a str"):
        asyncckpt.load(os.fsencode(tmp_path / "c"))
    with pytest.raises(asyncckpt.BadInputError, match=r"retention must be an asyncckpt\.RetentionPolicy or None, not int"):
        shared_ckpt.save({"w": torch.ones(2)}, tmp_path / "c", retention=3)
    assert _nothing_written(tmp_path / "c")


def test_a_retention_policy_from_the_top_level_applies_after_the_commit(shared_ckpt, tmp_path):
    for step in range(3):
        shared_ckpt.save({"w": torch.ones(2)}, tmp_path / f"s{step}", step=step,
                         retention=asyncckpt.RetentionPolicy(keep_last=2))
        shared_ckpt.finalize(blocking=True)
    assert sorted(i.name for i in asyncckpt.list_checkpoints(tmp_path)) == ["s1", "s2"]
