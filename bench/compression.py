"""zstd per-chunk compression (issue 15): ratio and MB/s per core next to no compression, in one run.

    python bench/compression.py [--mib 128] [--chunk-mib 32] [--levels 1 3] [--save] [--json OUT]

Three states, each ``--mib`` MiB: float32 weights (random normal), bf16 weights (the same, cast),
and Adam state (``exp_avg``/``exp_avg_sq`` of a 4096x4096-per-layer MLP after 5 real steps). Each
is cut into chunks as a save cuts it and run through the code a save and a load run
(``asyncckpt.format.encode_chunk`` / ``decode_chunk``) on one thread; MB/s per core is raw MB
over that thread's CPU time (``time.thread_time``), so other load on the machine does not count.
"none" is the uncompressed path: its only per-byte work is the CRC32C (write) and its check (read).
``--save`` also saves each state with ``AsyncCheckpointer`` to a local directory (durable time,
bytes on disk: wall-clock numbers, shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asyncckpt.format import ZSTD, checksum, decode_chunk, encode_chunk

MiB = 1 << 20


def weights_f32(mib: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(mib * MiB // 4 // 8, generator=g) * 0.02 for _ in range(8)]


def weights_bf16(mib: int) -> list[torch.Tensor]:
    return [t.to(torch.bfloat16) for t in weights_f32(2 * mib)]


def adam_state(mib: int, steps: int = 5) -> list[torch.Tensor]:
    """exp_avg and exp_avg_sq of an MLP after ``steps`` real Adam steps (fp32, 2 x params bytes)."""
    torch.manual_seed(0)
    width = 1024
    layers = max(1, mib * MiB // 2 // 4 // (width * width))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(64, width)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]


def chunks_of(tensors: list[torch.Tensor], chunk: int) -> list[memoryview]:
    image = np.concatenate([t.contiguous().view(torch.uint8).numpy().reshape(-1) for t in tensors])
    view = memoryview(image)
    return [view[i : i + chunk] for i in range(0, len(view), chunk)]


def run_codec(chunks: list[memoryview], level: int | None) -> dict[str, float]:
    raw = sum(len(c) for c in chunks)
    t0 = time.thread_time()
    if level is None:
        encoded = [(c, None, checksum(c)) for c in chunks]
    else:
        encoded = [encode_chunk(c, ZSTD, level) for c in chunks]
    t1 = time.thread_time()
    stored = sum(len(s) for s, _, _ in encoded)
    for (s, info, crc), c in zip(encoded, chunks):
        arr = np.frombuffer(s, dtype=np.uint8)
        assert checksum(memoryview(arr)) == crc  # what every read does
        if info is not None:
            assert decode_chunk(arr, info, len(c), "bench").nbytes == len(c)
    t2 = time.thread_time()
    return {"raw_mib": raw / MiB, "stored_mib": stored / MiB, "ratio": raw / stored,
            "write_mb_s_core": raw / 1e6 / max(t1 - t0, 1e-9), "read_mb_s_core": raw / 1e6 / max(t2 - t1, 1e-9)}


def run_save(tensors: list[torch.Tensor], level: int | None, root: str, chunk: int) -> dict[str, float]:
    import asyncckpt

    kw: dict[str, Any] = {} if level is None else {"compression": "zstd", "compression_level": level}
    state = {f"t{i}": t for i, t in enumerate(tensors)}
    with asyncckpt.AsyncCheckpointer(chunk_size=chunk, **kw) as ck:
        ck.save(state, f"{root}/warm", overwrite=True)
        ck.finalize(blocking=True)
        t0 = time.perf_counter()
        ck.save(state, f"{root}/c", overwrite=True)
        ck.finalize(blocking=True)
        dt = time.perf_counter() - t0
    data = [p for p in Path(root, "c").iterdir() if p.suffix == ".data"]
    return {"durable_s": dt, "on_disk_mib": sum(p.stat().st_size for p in data) / MiB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=128, help="size of each state (MiB)")
    p.add_argument("--chunk-mib", type=int, default=32, help="chunk size (MiB), as AsyncCheckpointer(chunk_size=)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 3])
    p.add_argument("--save", action="store_true", help="also time real saves to a local directory")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    chunk = args.chunk_mib * MiB
    states = {"float32 weights": weights_f32(args.mib), "bf16 weights": weights_bf16(args.mib),
              "Adam exp_avg/exp_avg_sq": adam_state(args.mib)}
    rows: list[dict[str, Any]] = []
    for name, tensors in states.items():
        chunks = chunks_of(tensors, chunk)
        for level in [None, *args.levels]:
            row = {"state": name, "compression": "none" if level is None else f"zstd-{level}",
                   **run_codec(chunks, level)}
            if args.save:
                with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
                    row.update(run_save(tensors, level, root, chunk))
            rows.append(row)
    head = f"{'state':<26}{'compression':<13}{'MiB':>7}{'stored':>9}{'ratio':>7}{'write MB/s/core':>17}{'read MB/s/core':>16}"
    if args.save:
        head += f"{'save s':>8}"
    print(f"chunks of {args.chunk_mib} MiB, one thread; torch {torch.__version__}")
    print(head)
    for r in rows:
        line = (f"{r['state']:<26}{r['compression']:<13}{r['raw_mib']:>7.0f}{r['stored_mib']:>9.1f}{r['ratio']:>7.3f}"
                f"{r['write_mb_s_core']:>17.0f}{r['read_mb_s_core']:>16.0f}")
        if args.save:
            line += f"{r['durable_s']:>8.2f}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
