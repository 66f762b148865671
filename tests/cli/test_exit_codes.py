"""One exit-status contract for every verb, local and S3 alike (docs/cli.md, "Exit status").

0 ok; 1 a checkpoint failed verification or a delete was refused for safety; 2 usage error or
nothing there (missing path, directory, bucket, prefix; not a checkpoint).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import asyncckpt
from asyncckpt import cli

VERBS = ("ls", "inspect", "verify", "rm", "prune", "export", "pause")


def _flip(p: Path, offset: int) -> None:
    b = bytearray(p.read_bytes())
    b[offset] ^= 0x01
    p.write_bytes(bytes(b))


def _damage_commit(w: Path) -> None:
    _flip(w / "run" / "step-1" / "COMMIT", 20)


def _damage_data(w: Path) -> None:
    _flip(w / "run" / "step-2" / "rank-00000.data", 10)


def _damage_pt(w: Path) -> None:
    _flip(w / "model.pt", (w / "model.pt").stat().st_size // 2)


def _incomplete(w: Path) -> None:
    (w / "run" / "step-1" / "COMMIT").unlink()


# (verb and arguments with {w} for the work directory, how to prepare it, exit status, words in the output)
LOCAL: list[tuple[str, Callable[[Path], None] | None, int, str]] = [
    ("ls {w}/run", None, 0, "2 complete"),
    ("ls {w}/empty", None, 0, "0 complete"),
    ("ls {w}/missing", None, 2, "no such directory"),
    ("ls {w}/notes.txt", None, 2, "not a root"),
    ("ls {w}/run", _damage_commit, 0, "incomplete or corrupt"),
    ("inspect {w}/run", None, 0, "(latest)"),
    ("inspect {w}/run/step-1", None, 0, "values of rank 0"),
    ("inspect {w}/model.pt", None, 0, "torch.save file"),
    ("inspect {w}/missing", None, 2, "no such file or directory"),
    ("inspect {w}/papers", None, 2, "not a complete checkpoint"),
    ("inspect {w}/notes.txt", None, 2, "is not a checkpoint: it is a file"),
    ("inspect {w}/run/step-1 --rank 3", None, 2, "has ranks 0..0"),
    ("inspect {w}/run/step-1", _incomplete, 2, "no COMMIT record"),
    ("inspect {w}/run/step-1", _damage_commit, 1, "checksum mismatch"),
    ("verify {w}/run {w}/run/step-1", None, 0, "OK"),
    ("verify {w}/model.pt", None, 0, "every CRC-32 matches"),
    ("verify {w}/model.pt", _damage_pt, 1, "fails its CRC-32"),
    ("verify {w}/run/step-2", _damage_data, 1, "FAILED"),
    ("verify {w}/run/step-1", _damage_commit, 1, "checksum mismatch"),
    ("verify {w}/missing", None, 2, "no such file or directory"),
    ("verify {w}/notes.txt", None, 2, "is not a checkpoint"),
    ("verify {w}/papers {w}/run/step-2", None, 2, "OK"),  # the worst status of all; the others still run
    ("rm {w}/run/step-1", None, 0, "deleted"),
    ("rm {w}/run/step-1", _damage_commit, 0, "deleted"),  # its manifest proves it is ours
    ("rm {w}/run", None, 1, "--force"),
    ("rm {w}/run/step-2", None, 1, "points to"),
    ("rm --force {w}/run", None, 0, "now points to step-1"),
    ("rm {w}/missing", None, 2, "no such file or directory"),
    ("rm {w}/papers", None, 2, "not a checkpoint"),
    ("rm {w}/notes.txt", None, 2, "not a checkpoint"),
    ("rm {w}/run/step-2 {w}/papers", None, 2, "points to"),
    ("prune {w}/run --keep-last 1", None, 0, "deleted 1"),
    ("prune {w}/run", None, 2, "at least one"),
    ("prune {w}/missing --keep-last 1", None, 2, "no such directory"),
    ("prune {w}/notes.txt --keep-last 1", None, 2, "not a root"),
    ("export {w}/run --to {w}/m.pt", None, 0, "exported"),
    ("export {w}/run --to {w}/model.pt", None, 2, "exists"),
    ("export {w}/missing --to {w}/m.pt", None, 2, "no such file or directory"),
    ("export {w}/run/step-2 --to {w}/m.pt", _damage_data, 1, "fail their checksum"),
    ("export {w}/run --to {w}/m.pt --key nope", None, 2, "no nope here"),
    ("pause {w}/run", None, 0, "pause requested"),
    ("pause {w}/missing", None, 2, "no such directory"),
]


@pytest.fixture(scope="module")
def template(shared_ckpt: asyncckpt.AsyncCheckpointer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("codes")
    for step in (1, 2):
        shared_ckpt.save({"w": torch.full((64,), float(step)), "n": step}, base / "run" / f"step-{step}", step=step)
    shared_ckpt.finalize(blocking=True)
    (base / "papers").mkdir()
    (base / "papers" / "thesis.txt").write_text("x")
    (base / "empty").mkdir()
    (base / "notes.txt").write_text("x")
    torch.save({"w": torch.arange(5000.0)}, base / "model.pt")
    return base


def _run(capsys: Any, line: str, w: Path) -> tuple[int, str]:
    rc = cli.main(line.format(w=w).split())
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize(("line", "prepare", "code", "words"), LOCAL, ids=[f"{c[0]}:{c[2]}" for c in LOCAL])
def test_local_exit_status(capsys: Any, template: Path, tmp_path: Path, line: str,
                           prepare: Callable[[Path], None] | None, code: int, words: str) -> None:
    w = tmp_path / "w"
    shutil.copytree(template, w)
    if prepare is not None:
        prepare(w)
    rc, text = _run(capsys, line, w)
    assert rc == code and words in text, text


def test_every_verb_is_covered_and_usage_errors_are_2(capsys: Any) -> None:
    assert {line.split()[0] for line, *_ in LOCAL} == set(VERBS)
    assert {line.split()[0] for line in S3} == set(VERBS)
    for argv in (["frobnicate"], ["ls"], ["prune", "x", "--keep-last", "0"], ["verify", "--nope", "x"]):
        with pytest.raises(SystemExit) as ei:
            cli.main(argv)
        assert ei.value.code == 2
    capsys.readouterr()


# -- S3: the same statuses -----------------------------------------------------------------------
S3 = {
    "ls s3://{b}/run": (0, "2 complete"),
    "ls s3://{b}/empty-prefix": (0, "0 complete"),
    "ls s3://{nb}/run": (2, "does not exist"),
    "inspect s3://{b}/run": (0, "(latest)"),
    "inspect s3://{b}/run/step-9": (2, "nothing there"),
    "inspect s3://{b}/papers": (2, "a prefix holding 1 object"),
    "inspect s3://{nb}/run/step-1": (2, "does not exist"),
    "verify s3://{b}/run/step-1": (0, "OK"),
    "verify s3://{b}/run/step-9": (2, "nothing there"),
    "verify s3://{nb}/run": (2, "does not exist"),
    "rm s3://{b}/run/step-2": (1, "points to"),
    "rm s3://{b}/papers": (2, "not a checkpoint"),
    "rm s3://{b}/papers/thesis.txt": (2, "an object of 1 bytes"),
    "rm s3://{nb}/run/step-1": (2, "does not exist"),
    "prune s3://{b}/run --keep-last 5": (0, "deleted 0"),
    "prune s3://{nb}/run --keep-last 1": (2, "does not exist"),
    "export s3://{nb}/run --to {tmp}/m.pt": (2, "does not exist"),
    "export s3://{b}/run --to {tmp}/m.pt": (0, "exported"),
    "pause s3://{nb}/run": (2, "does not exist"),
    "pause s3://{b}/run": (0, "pause requested"),
}


@pytest.fixture(scope="module")
def s3_template(moto_server: Any) -> Iterator[str]:
    bucket = moto_server.create_bucket()
    with asyncckpt.AsyncCheckpointer(storage_options=moto_server.options()) as ck:
        for step in (1, 2):
            ck.save({"w": torch.full((64,), float(step))}, f"s3://{bucket}/run/step-{step}", step=step)
    moto_server.client().put_object(Bucket=bucket, Key="papers/thesis.txt", Body=b"x")
    yield bucket
    moto_server.delete_bucket(bucket)


def test_s3_exit_status(capsys: Any, moto_server: Any, s3_template: str, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One test for all rows (they leave the bucket as it was): a fresh S3 client per command is the cost."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", moto_server.region)
    failures = []
    for line, (code, words) in S3.items():
        argv = line.format(b=s3_template, nb="no-such-bucket-here", tmp=tmp_path).split()
        rc = cli.main([*argv, "--endpoint-url", moto_server.endpoint_url])
        out = capsys.readouterr()
        if rc != code or words not in out.out + out.err:
            failures.append(f"{line}: exit {rc} (want {code}): {out.out + out.err}")
    assert not failures, "\n".join(failures)
