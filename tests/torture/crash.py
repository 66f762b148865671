"""Crash-consistency driver: SIGKILL the trainer, its worker, or both, at random moments.

``python -m tests.torture.crash --trials N --seed S [--workdir DIR] [--json OUT]``

Trials run in chains that share one root: each trial starts a fresh trainer
(:mod:`tests.torture.trainer`) on the root the previous kill left behind, so every trial also
proves that a fresh process resumes from, and saves again into, a root holding a torn save. A
trial picks (from the seed) a phase — planning, snapshot, streaming, manifest, commit, latest,
retention, or a random moment — which occurrence of it, a victim (trainer, worker, both; on
2-rank gloo chains also which rank) and a delay; the phase's storage operations are slowed a
little (tests.torture._inject) so that the delay lands inside the phase. After every kill the
driver checks the root (tests.torture.common.check_root): complete checkpoints load, verify and
hold exactly their step's state; ``latest`` names a complete one; every save whose finalize had
returned is still there; temp files are never listed. A killed trainer's worker must exit by
itself; a killed worker must surface as an error, and the trainer must carry on and finish.
Each chain ends with a clean run (no kill) that must resume, save and finish.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import PYTHON, REPO, check_root, ckpt_name, step_of, subprocess_env

PHASES = ("planning", "snapshot", "streaming", "manifest", "commit", "latest", "retention")
TRAINER_PHASES = {"planning", "commit", "latest", "retention"}
#: storage operation points (pauses) per phase, to size the kill window: see tests.torture._inject
_POINTS = {"planning": 2, "snapshot": 2, "streaming": 8, "manifest": 6, "commit": 13, "latest": 6, "retention": 6}
NUMEL = 1 << 20  # 4 MiB + 2 MiB of tensors per rank: two 5 MiB chunks
CHAIN = 4  # kill trials per root, then a clean run
TRIAL_TIMEOUT = 120.0


#: what each chain runs, by chain % 6: (world size, "raw" AsyncCheckpointer or "manager", backend)
CHAIN_KINDS = (
    (1, "raw", "local"), (1, "manager", "local"), (2, "raw", "local"),
    (1, "raw", "s3"), (1, "manager", "s3"), (2, "manager", "local"),
)


def chain_kind(chain: int) -> tuple[int, str, str]:
    return CHAIN_KINDS[chain % len(CHAIN_KINDS)]


@dataclass
class Trial:
    index: int
    chain: int
    world: int
    phase: str  # one of PHASES, or "random"
    victim: str  # trainer, worker, both
    rank: int
    occurrence: int
    delay: float
    slow_s: float


@dataclass
class TrialResult:
    trial: Trial
    killed: bool = False
    landed: str = ""
    problems: list[str] = field(default_factory=list)
    finalized: list[str] = field(default_factory=list)
    ready: int = -1  # the first step this run saves (after resuming)
    deleting: set[str] = field(default_factory=set)  # names retention began to delete
    checkpoints_loaded: int = 0
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)


def plan_trials(n: int, seed: int) -> list[Trial]:
    """The trials of a run, a pure function of (n, seed)."""
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        chain = i // CHAIN
        world = chain_kind(chain)[0]
        ph = rng.choice((*PHASES, "random"))
        victim = rng.choices(("trainer", "worker", "both"), weights=(4, 3, 3))[0]
        rank = 0 if (ph in TRAINER_PHASES and victim != "worker") else rng.randrange(world)
        slow = rng.uniform(0.01, 0.04)
        if ph == "random":
            delay, occurrence, slow = rng.uniform(0.0, 1.2), 1, 0.0
        else:
            delay = rng.uniform(0.0, 1.1 * _POINTS[ph] * slow)
            occurrence = rng.randint(1, 2 if ph == "retention" else 3)
        out.append(Trial(i, chain, world, ph, victim, rank, occurrence, round(delay, 4), round(slow, 4)))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, IndexError, ValueError):
        return None


class _Rank:
    """One trainer process of a trial and what its stdout said."""

    def __init__(self, rank: int, args: list[str], env: dict[str, str], q: queue.Queue) -> None:
        self.rank = rank
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "tests.torture.trainer", *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        self.worker_pids: list[int] = []
        self.active: dict[str, list[str]] = {"trainer": [], "worker": []}
        self.counts: Counter[str] = Counter()
        self.done = False
        self.reader = threading.Thread(target=self._read, args=(q,), daemon=True)
        self.reader.start()

    def _read(self, q: queue.Queue) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            q.put((self.rank, line.rstrip("\n")))
        q.put((self.rank, None))

    @property
    def worker(self) -> int | None:
        return self.worker_pids[-1] if self.worker_pids else None

    def kill_trainer(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def ours(self, pid: int) -> bool:
        """``pid`` is our trainer's worker: its child, or a fork of its worker template (its grandchild)."""
        parent = _parent(pid)
        return parent == self.proc.pid or (parent is not None and _parent(parent) == self.proc.pid)

    def kill_worker(self) -> bool:
        pid = self.worker
        # Only our trainer's own worker: never a pid that was reused by something else.
        if pid is not None and _alive(pid) and self.ours(pid):
            os.kill(pid, signal.SIGKILL)
            return True
        return False


def run_trainers(root: str, world: int, env_extra: dict[str, str], trial: Trial | None, numel: int,
                 saves: int, manager: bool = False) -> TrialResult:
    """Start ``world`` trainers on ``root``; kill as ``trial`` says (None: no kill); collect what happened."""
    res = TrialResult(trial or Trial(-1, -1, world, "none", "none", 0, 0, 0.0, 0.0))
    t0 = time.monotonic()
    q: queue.Queue = queue.Queue()
    port = str(_free_port())
    args = ["--root", root, "--numel", str(numel), "--saves", str(saves), *(["--manager"] if manager else [])]
    ranks = []
    for r in range(world):
        env = subprocess_env(**env_extra, WORLD_SIZE=str(world), RANK=str(r), MASTER_PORT=port)
        ranks.append(_Rank(r, args, env, q))
    open_pipes = world
    kill_at: float | None = None
    kill_others_at: float | None = None
    deleting = res.deleting
    crashes = []
    deadline = t0 + TRIAL_TIMEOUT
    try:
        while open_pipes:
            try:
                r, line = q.get(timeout=0.01)
            except queue.Empty:
                r, line = -1, ""
            now = time.monotonic()
            if line is None:
                open_pipes -= 1
            elif r >= 0:
                res.output.append(f"[{now - t0:7.3f}] R{r} {line}")
                rk = ranks[r]
                parts = line.split()
                if line.startswith("PID worker") and len(parts) == 3 and parts[2].isdigit():
                    rk.worker_pids.append(int(parts[2]))
                elif line.startswith("@@ ") and len(parts) >= 6:
                    _, role, pid, what, ph, name = parts[:6]
                    if role == "worker" and int(pid) not in rk.worker_pids:
                        rk.worker_pids.append(int(pid))
                    if what == "BEGIN":
                        rk.active[role].append(ph)
                        if ph == "retention":
                            deleting.add(name)
                        phase_rank = 0 if ph in TRAINER_PHASES else trial.rank if trial else 0
                        if trial and kill_at is None and ph == trial.phase and r == phase_rank:
                            rk.counts[ph] += 1
                            if rk.counts[ph] == trial.occurrence:
                                kill_at = now + trial.delay
                    elif what == "END" and ph in rk.active[role]:
                        rk.active[role].remove(ph)
                elif line.startswith("READY"):
                    res.ready = int(parts[1])
                    if trial and trial.phase == "random" and r == trial.rank and kill_at is None:
                        kill_at = now + trial.delay
                elif line.startswith("FINALIZED"):
                    if parts[1] not in res.finalized:
                        res.finalized.append(parts[1])
                elif line.startswith("PROBLEM"):
                    res.problems.append(f"rank {r}: {line}")
                elif line.startswith("CRASH"):
                    crashes.append((r, line))
                elif line == "DONE":
                    rk.done = True
            if trial and kill_at is not None and not res.killed and now >= kill_at:
                rk = ranks[trial.rank]
                res.landed = _landed(rk, trial.victim)
                if trial.victim in ("worker", "both"):
                    if not rk.kill_worker() and trial.victim == "worker":
                        res.landed = "worker-gone"
                if trial.victim in ("trainer", "both"):
                    rk.kill_trainer()
                    if world > 1:  # the job scheduler takes down the other ranks too, a moment later
                        kill_others_at = now + random.Random(trial.index).uniform(0.0, 0.3)
                res.killed = True
            if kill_others_at is not None and now >= kill_others_at:
                for other in ranks:
                    other.kill_trainer()
                kill_others_at = None
            if now > deadline:
                res.problems.append(f"trial did not finish within {TRIAL_TIMEOUT:.0f} s (hang)")
                for rk in ranks:
                    rk.kill_trainer()
                    rk.kill_worker()
                deadline = float("inf")
        for rk in ranks:
            rk.proc.wait(30)
    finally:
        for rk in ranks:
            if rk.proc.poll() is None:
                rk.proc.kill()
                rk.proc.wait()
    # Workers of killed trainers must leave by themselves (invariant 6).
    t_orphan = time.monotonic() + 15
    for rk in ranks:
        for pid in rk.worker_pids:
            while _alive(pid) and time.monotonic() < t_orphan:
                time.sleep(0.05)
            if _alive(pid):
                res.problems.append(f"rank {rk.rank}: worker {pid} still running 15 s after its trainer ended (orphan)")
                if _parent(pid) in (1, None) or rk.ours(pid):
                    os.kill(pid, signal.SIGKILL)
    trainers_killed = res.killed and res.trial.victim in ("trainer", "both")
    for rk in ranks:
        code = rk.proc.returncode
        if not trainers_killed and (code != 0 or not rk.done):
            res.problems.append(f"rank {rk.rank}: trainer exited with {code} without a kill of a trainer: "
                                + "; ".join(line for r, line in crashes if r == rk.rank)[:2000])
    if trial is not None and not res.killed:
        res.landed = "missed"
    res.seconds = time.monotonic() - t0
    return res


def _landed(rk: _Rank, victim: str) -> str:
    """The phase in progress when the kill was sent (the victim's own phase first)."""
    order = ("worker", "trainer") if victim == "worker" else ("trainer", "worker")
    for role in order:
        if rk.active[role]:
            return rk.active[role][-1]
    return "between-phases"


@dataclass
class Stats:
    seed: int
    trials: int = 0
    kills: int = 0
    missed: int = 0
    kills_by_phase: Counter[str] = field(default_factory=Counter)
    kills_by_victim: Counter[str] = field(default_factory=Counter)
    multi_rank_trials: int = 0
    trials_by_kind: Counter[str] = field(default_factory=Counter)
    leftover_incomplete_uploads: int = 0
    clean_runs: int = 0
    checkpoints_verified: int = 0
    finalized_saves: int = 0
    data_lost: int = 0
    problems: list[str] = field(default_factory=list)
    leftover_temp_files: int = 0
    leftover_temp_bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["kills_by_phase"] = dict(sorted(self.kills_by_phase.items()))
        d["kills_by_victim"] = dict(sorted(self.kills_by_victim.items()))
        d["trials_by_kind"] = dict(sorted(self.trials_by_kind.items()))
        return d


def _check(root: str, world: int, numel: int, must_have: list[str], deleting: set[str], stats: Stats,
           where: str, options: dict | None = None) -> list[str]:
    rep = check_root(root, numel=numel, must_have=must_have, deleting=deleting, world_size=world, options=options)
    stats.checkpoints_verified += rep.loaded
    stats.data_lost += sum("DATA LOST" in p or "WRONG DATA" in p for p in rep.problems)
    return [f"{where}: {p}" for p in rep.problems]


class _S3:
    """A moto S3 server in this (driver) process, started on first use; one bucket per chain."""

    server = None

    @classmethod
    def root(cls, chain: int, seed: int) -> tuple[str, str, dict]:
        if cls.server is None:
            from tests.s3_servers import MotoServer

            cls.server = MotoServer()
            cls.server.start()
        bucket = cls.server.create_bucket(f"torture-{seed}-{chain}-{os.getpid()}")
        # single_put_threshold=0: every data file is a multipart upload (a kill can tear one)
        return f"s3://{bucket}/run", bucket, cls.server.options(single_put_threshold=0)

    @classmethod
    def stop(cls) -> None:
        if cls.server is not None:
            cls.server.stop()
            cls.server = None


def run(trials: int, seed: int, workdir: str | None = None, *, numel: int = NUMEL, saves: int = 5,
        log: bool = True, logdir: str | None = None, start: int = 0, chains: set[int] | None = None,
        per_chain: int | None = None) -> Stats:
    """Run kill trials ``start..trials-1`` of ``seed`` (plus one clean run per chain); return the counts.

    ``chains`` runs only those chains, ``per_chain`` only the first trials of each (bounded CI runs).
    """
    try:
        return _run(trials, seed, workdir, numel=numel, saves=saves, log=log, logdir=logdir, start=start,
                    chains=chains, per_chain=per_chain)
    finally:
        _S3.stop()


def _run(trials: int, seed: int, workdir: str | None, *, numel: int, saves: int, log: bool, logdir: str | None,
         start: int, chains: set[int] | None, per_chain: int | None) -> Stats:
    t_start = time.monotonic()
    stats = Stats(seed=seed)
    base = Path(workdir or tempfile.mkdtemp(prefix="torture-crash-"))
    base.mkdir(parents=True, exist_ok=True)
    plan = [t for t in plan_trials(trials, seed) if t.chain >= start // CHAIN and (chains is None or t.chain in chains)]
    by_chain: dict[int, list[Trial]] = {}
    for t in plan:
        if per_chain is None or len(by_chain.get(t.chain, [])) < per_chain:
            by_chain.setdefault(t.chain, []).append(t)
    for chain, ts in by_chain.items():
        world, mode, backend = chain_kind(chain)
        manager = mode == "manager"
        options: dict = {}
        bucket = None
        if backend == "s3":
            root, bucket, options = _S3.root(chain, seed)
        else:
            root = str(base / f"chain-{seed}-{chain:04d}")
            shutil.rmtree(root, ignore_errors=True)
        s3_env = {"TORTURE_S3_OPTIONS": json.dumps(options)} if options else {}
        finalized: dict[str, int] = {}
        deleting: set[str] = set()
        chain_problems: list[str] = []
        for t in ts:
            env = {"TORTURE_ANNOUNCE": "1", **s3_env}
            if t.phase != "random":
                env.update(TORTURE_SLOW=t.phase, TORTURE_SLOW_S=str(t.slow_s))
            res = run_trainers(root, world, env, t, numel, saves, manager)
            deleting |= res.deleting
            for name in res.finalized:
                finalized[name] = step_of(name) or 0
            must = [n for n in finalized if n not in deleting]
            res.problems += _check(root, world, numel, must, deleting, stats, f"trial {t.index}", options)
            stats.trials += 1
            stats.trials_by_kind[f"{mode}/{backend}/{world}-rank"] += 1
            stats.multi_rank_trials += world > 1
            if res.killed and res.landed != "worker-gone":
                stats.kills += 1
                stats.kills_by_phase[res.landed] += 1
                stats.kills_by_victim[t.victim] += 1
            if not res.killed or res.landed == "worker-gone":
                stats.missed += 1
            stats.finalized_saves += len(res.finalized)
            if log:
                print(f"trial {t.index:4d} chain {chain} {mode:>7} {backend:>5} world {world} {t.phase:>10}#{t.occurrence} {t.victim:>7}@r{t.rank}"
                      f" +{t.delay:.3f}s -> {res.landed or 'no kill':>14} | finalized {len(res.finalized)} "
                      f"| {res.seconds:5.1f}s | {'OK' if not res.problems else 'PROBLEMS: ' + ' | '.join(res.problems)}",
                      flush=True)
            if res.problems:
                chain_problems += res.problems
                _dump(logdir, f"seed{seed}-trial{t.index}", res)
        # The chain ends with a clean run: a fresh process resumes and saves again.
        res = run_trainers(root, world, {"TORTURE_ANNOUNCE": "1", **s3_env}, None, numel, 2, manager)
        deleting |= res.deleting
        stats.clean_runs += 1
        if ckpt_name(res.ready + 1) not in res.finalized:  # the manager reports only its newest commit
            res.problems.append(f"clean run from step {res.ready} finalized {res.finalized}: its last save is missing")
        for name in res.finalized:
            finalized[name] = step_of(name) or 0
        must = [n for n in finalized if n not in deleting]
        res.problems += _check(root, world, numel, must, deleting, stats, f"chain {chain} clean run", options)
        rep = check_root(root, numel=numel, options=options)
        stats.leftover_temp_files += rep.temp_files
        stats.leftover_temp_bytes += rep.temp_bytes
        uploads: list[str] = []
        if bucket is not None:
            uploads = _S3.server.incomplete_uploads(bucket)
            stats.leftover_incomplete_uploads += len(uploads)
            if uploads:
                res.problems.append(f"chain {chain}: incomplete multipart uploads left after the next save ran: {uploads}")
        if log:
            print(f"chain {chain} clean run: finalized {res.finalized} | {res.seconds:5.1f}s | "
                  f"leftover temp files {rep.temp_files} ({rep.temp_bytes} bytes), uploads {len(uploads)} | "
                  f"{'OK' if not res.problems else 'PROBLEMS: ' + ' | '.join(res.problems)}", flush=True)
        if res.problems:
            chain_problems += res.problems
            _dump(logdir, f"seed{seed}-chain{chain}-clean", res)
        stats.problems += chain_problems
        if bucket is not None:
            _S3.server.delete_bucket(bucket)
        elif not chain_problems:
            shutil.rmtree(root, ignore_errors=True)
    stats.seconds = time.monotonic() - t_start
    if workdir is None and not stats.problems:
        shutil.rmtree(base, ignore_errors=True)
    return stats


def _dump(logdir: str | None, tag: str, res: TrialResult) -> None:
    if logdir is None:
        return
    os.makedirs(logdir, exist_ok=True)
    with open(os.path.join(logdir, f"{tag}.log"), "w") as f:
        f.write(json.dumps(asdict(res.trial)) + "\n" + "\n".join(res.problems) + "\n\n" + "\n".join(res.output) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where roots go (default: a temp dir, removed when all pass)")
    ap.add_argument("--logdir", default=None, help="write the full output of failing trials here")
    ap.add_argument("--json", default=None, help="write the counts as JSON here")
    ap.add_argument("--start", type=int, default=0,
                    help="skip the chains before this trial: run a long campaign in pieces (same --trials and --seed)")
    args = ap.parse_args(argv)
    stats = run(args.trials, args.seed, args.workdir, logdir=args.logdir, start=args.start)
    summary = json.dumps(stats.to_json(), indent=2)
    print(summary)
    if args.json:
        with open(args.json, "w") as f:
            f.write(summary + "\n")
    return 1 if stats.problems else 0


if __name__ == "__main__":
    sys.exit(main())
