"""Power-loss simulation for local storage: replay only what fsync made durable.

A trainer subprocess (:mod:`tests.torture.trainer`) saves a few checkpoints with
``TORTURE_JOURNAL`` set, so every mutation LocalStorage makes — in the trainer and in the
worker — is appended to a journal with inode numbers: create, write, truncate, fsync, rename,
link, unlink, mkdir, rmdir, directory fsync, plus markers (a save's finalize returned;
retention began/ended deleting a checkpoint).

The model of a crash at journal position ``k`` (POSIX, no filesystem-specific ordering):

* a file's content is durable once ``fsync`` on it returned;
* a directory entry (create, mkdir, rename, link, unlink, rmdir) is durable once the directory
  holding it was fsynced afterwards (a rename needs both directories);
* anything not durable at ``k`` may or may not have reached the disk, in any combination.

For every ``k`` the simulator materializes the durable state only ("durable"), everything
before ``k`` ("everything"), and a few random mixes of the non-durable operations, then
checks the same invariants as the crash driver (tests.torture.common.check_root).

``python -m tests.torture.powerloss --seed S [--mixes N] [--saves N]`` runs it and prints the
counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from .common import PYTHON, REPO, check_root, subprocess_env

NUMEL = 1 << 14  # 64 KiB + 16 KiB: one chunk; the journal holds every byte written
Id = tuple[int, int]  # (inode, generation): inode numbers are reused after unlink


def record(root: str, journal: str, *, saves: int = 4, no_latest: str = "1", keep: int = 2, numel: int = NUMEL) -> str:
    """Run the trainer with the journal on; return its output."""
    os.makedirs(root, exist_ok=True)
    env = subprocess_env(TORTURE_JOURNAL=journal, TORTURE_ANNOUNCE="1")
    p = subprocess.run(
        [PYTHON, "-m", "tests.torture.trainer", "--root", root, "--numel", str(numel), "--saves", str(saves),
         "--keep", str(keep), "--no-latest", no_latest, "--blocking-every", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    if p.returncode != 0 or "DONE" not in p.stdout:
        raise RuntimeError(f"journaled trainer failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def read_journal(path: str) -> list[tuple[Any, ...]]:
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        out.append(pickle.loads(data[pos + 8 : pos + 8 + n]))
        pos += 8 + n
    return out


def normalize(records: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Replace inode numbers by (inode, generation); a create or mkdir starts a new generation."""
    gen: dict[int, int] = defaultdict(int)

    def cur(ino: int) -> Id:
        return (ino, gen[ino])

    ops: list[tuple[Any, ...]] = []
    for rec in records:
        kind = rec[0]
        if kind in ("create", "mkdir"):
            _, d, name, ino = rec
            parent = cur(d)
            gen[ino] += 1
            ops.append((kind, parent, name, cur(ino)))
        elif kind == "write":
            ops.append(("write", cur(rec[1]), rec[2], rec[3]))
        elif kind == "trunc":
            ops.append(("trunc", cur(rec[1]), rec[2]))
        elif kind in ("fsync", "fsyncdir"):
            ops.append((kind, cur(rec[1])))
        elif kind == "rename":
            _, sd, sn, dd, dn, ino = rec
            ops.append(("rename", cur(sd), sn, cur(dd), dn, cur(ino)))
        elif kind == "link":
            _, dd, dn, ino = rec
            ops.append(("link", cur(dd), dn, cur(ino)))
        elif kind in ("unlink", "rmdir"):
            _, d, name, ino = rec
            if ino != -1:
                ops.append((kind, cur(d), name, cur(ino)))
        elif kind == "mark":
            ops.append(rec)
    return ops


def _syncs_needed(op: tuple[Any, ...]) -> list[tuple[str, Id]]:
    """What must be fsynced after ``op`` for it to be durable."""
    kind = op[0]
    if kind in ("write", "trunc"):
        return [("f", op[1])]
    if kind in ("create", "mkdir", "unlink", "rmdir", "link"):
        return [("d", op[1])]
    if kind == "rename":
        return [("d", op[1]), ("d", op[3])]
    return []


def durable_at(ops: list[tuple[Any, ...]]) -> list[int]:
    """For each op, the journal position after which it is durable (len(ops)+1: never)."""
    never = len(ops) + 1
    next_sync: dict[tuple[str, Id], int] = {}
    out = [never] * len(ops)
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if op[0] == "fsync":
            next_sync[("f", op[1])] = i + 1
        elif op[0] == "fsyncdir":
            next_sync[("d", op[1])] = i + 1
        needs = _syncs_needed(op)
        if needs:
            out[i] = max(next_sync.get(n, never) for n in needs)
    return out


@dataclass
class FS:
    dirs: dict[Id, dict[str, Id]] = field(default_factory=dict)
    files: dict[Id, bytearray] = field(default_factory=dict)


def replay(ops: list[tuple[Any, ...]], keep: list[bool], root: Id) -> FS:
    fs = FS(dirs={root: {}})
    for op, kept in zip(ops, keep):
        if not kept:
            continue
        kind = op[0]
        if kind == "mkdir":
            fs.dirs.setdefault(op[3], {})
            fs.dirs.setdefault(op[1], {})[op[2]] = op[3]
        elif kind == "create":
            fs.files[op[3]] = bytearray()
            fs.dirs.setdefault(op[1], {})[op[2]] = op[3]
        elif kind == "write":
            buf = fs.files.setdefault(op[1], bytearray())
            off, data = op[2], op[3]
            if len(buf) < off:
                buf.extend(b"\0" * (off - len(buf)))
            buf[off : off + len(data)] = data
        elif kind == "trunc":
            buf = fs.files.setdefault(op[1], bytearray())
            if len(buf) > op[2]:
                del buf[op[2] :]
            else:
                buf.extend(b"\0" * (op[2] - len(buf)))
        elif kind in ("rename", "link"):
            if kind == "rename":
                _, sd, sn, dd, dn, ino = op
                if fs.dirs.get(sd, {}).get(sn) == ino:
                    del fs.dirs[sd][sn]
            else:
                _, dd, dn, ino = op
            fs.dirs.setdefault(dd, {})[dn] = ino
            if ino not in fs.dirs:
                fs.files.setdefault(ino, bytearray())
        elif kind in ("unlink", "rmdir"):
            if fs.dirs.get(op[1], {}).get(op[2]) == op[3]:
                del fs.dirs[op[1]][op[2]]
    return fs


def tree_of(fs: FS, root: Id) -> dict[str, bytes | None]:
    """path -> content (None for a directory), reachable from the root."""
    out: dict[str, bytes | None] = {}

    def walk(d: Id, prefix: str, depth: int) -> None:
        for name, child in sorted(fs.dirs.get(d, {}).items()):
            path = f"{prefix}{name}"
            if child in fs.dirs:
                out[path] = None
                if depth < 16:
                    walk(child, path + "/", depth + 1)
            else:
                out[path] = bytes(fs.files.get(child, b""))

    walk(root, "", 0)
    return out


def materialize(tree: dict[str, bytes | None], dest: str) -> None:
    for path, content in tree.items():
        full = os.path.join(dest, path)
        if content is None:
            os.makedirs(full, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(content)


@dataclass
class PowerLossStats:
    seed: int
    operations: int = 0
    fsyncs: int = 0
    dir_fsyncs: int = 0
    crash_points: int = 0
    cases: int = 0
    distinct_states: int = 0
    checkpoints_verified: int = 0
    data_lost: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def explore(ops: list[tuple[Any, ...]], root: Id, *, numel: int, seed: int, mixes: int, stats: PowerLossStats,
            scratch: str) -> None:
    """Check every crash point under the durable-only, everything, and ``mixes`` random states."""
    dur = durable_at(ops)
    rng = random.Random(seed)
    seen: dict[str, list[str]] = {}
    stats.operations = sum(op[0] != "mark" for op in ops)
    stats.fsyncs = sum(op[0] == "fsync" for op in ops)
    stats.dir_fsyncs = sum(op[0] == "fsyncdir" for op in ops)
    for k in range(len(ops) + 1):
        if k < len(ops) and ops[k][0] == "mark":
            continue  # the same state as the next operation's crash point
        stats.crash_points += 1
        finalized = [op[2] for op in ops[:k] if op[0] == "mark" and op[1] == "finalized"]
        deleting = {op[2] for op in ops[:k] if op[0] == "mark" and op[1] == "deleting"}
        variants = [("durable", [dur[i] <= k for i in range(k)]), ("everything", [True] * k)]
        for m in range(mixes):
            p = rng.random()
            variants.append((f"mix{m}", [dur[i] <= k or rng.random() < p for i in range(k)]))
        for label, keep in variants:
            stats.cases += 1
            tree = tree_of(replay(ops[:k], keep, root), root)
            h = hashlib.sha1(repr(sorted((p, hashlib.sha1(c).hexdigest() if c is not None else None)
                                         for p, c in tree.items())).encode()).hexdigest()
            key = h + repr(sorted(finalized)) + repr(sorted(deleting))
            if key not in seen:
                dest = tempfile.mkdtemp(dir=scratch)
                try:
                    materialize(tree, dest)
                    rep = check_root(dest, numel=numel, must_have=finalized, deleting=deleting)
                finally:
                    shutil.rmtree(dest, ignore_errors=True)
                stats.distinct_states += 1
                stats.checkpoints_verified += rep.loaded
                seen[key] = rep.problems
                stats.data_lost += sum("DATA LOST" in p or "WRONG DATA" in p for p in rep.problems)
            for p in seen[key]:
                what = ops[k - 1][:3] if k else ("start",)
                stats.problems.append(f"crash after op {k} {what!r} ({label}): {p}")


def run(seed: int = 0, *, mixes: int = 3, saves: int = 4, workdir: str | None = None) -> PowerLossStats:
    t0 = time.monotonic()
    stats = PowerLossStats(seed=seed)
    base = tempfile.mkdtemp(prefix="torture-powerloss-", dir=workdir)
    scratch_parent = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    scratch = tempfile.mkdtemp(prefix="torture-pl-", dir=scratch_parent)
    try:
        root = os.path.join(base, "root")
        journal = os.path.join(base, "journal")
        os.makedirs(root)
        root_id = (os.stat(root).st_ino, 0)
        record(root, journal, saves=saves)
        ops = normalize(read_journal(journal))
        explore(ops, root_id, numel=NUMEL, seed=seed, mixes=mixes, stats=stats, scratch=scratch)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    stats.seconds = time.monotonic() - t0
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mixes", type=int, default=3, help="random mixes of non-durable operations per crash point")
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    stats = run(args.seed, mixes=args.mixes, saves=args.saves)
    d = asdict(stats)
    d["problems_total"] = len(stats.problems)
    d["problems"] = stats.problems[:50]
    out = json.dumps(d, indent=2)
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            f.write(out + "\n")
    return 1 if stats.problems else 0


if __name__ == "__main__":
    sys.exit(main())
