"""S3Storage vs plain aiobotocore: upload and download throughput of one large object on SeaweedFS.

Starts its own ``weed mini`` on 127.0.0.1 (as the tests do), then, for each variant, times
``--repeats`` runs and prints the median:

- upload:   S3Storage writer (16 MiB parts, 8 concurrent write_part calls, CRC32C on / off)
            vs create_multipart_upload + upload_part x N (same parts, same concurrency) + complete;
- download: S3Storage.read_into (16 MiB ranges, 8 in flight) into one buffer
            vs ranged get_object calls (same ranges, same concurrency) copied into one buffer.

Run from the repository root:  python bench/s3_throughput.py [--size-mib 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiobotocore.session import get_session
from botocore.config import Config

from asyncckpt.storage.s3 import S3Storage
from tests.s3_servers import SeaweedServer

MiB = 1024 * 1024


def make_data(size: int) -> bytes:
    block = os.urandom(16 * MiB)
    out = bytearray(size)
    for off in range(0, size, len(block)):
        out[off : off + len(block)] = block[: size - off]
        out[off : off + 8] = off.to_bytes(8, "big")  # no two parts alike
    return bytes(out)


async def s3storage_upload(st: S3Storage, key: str, data: bytes, part: int, conc: int) -> None:
    view = memoryview(data)
    w = await st.open_writer(key, size_hint=len(data))
    sem = asyncio.Semaphore(conc)  # the engine keeps a bounded number of chunks in flight

    async def one(i: int, off: int) -> None:
        async with sem:
            await w.write_part(i, off, view[off : off + part])

    await asyncio.gather(*(one(i, off) for i, off in enumerate(range(0, len(data), part))))
    await w.commit()


async def plain_upload(client: Any, bucket: str, key: str, data: bytes, part: int, conc: int) -> None:
    up = await client.create_multipart_upload(Bucket=bucket, Key=key)
    sem = asyncio.Semaphore(conc)
    parts: list[dict[str, Any]] = []

    async def one(n: int, off: int) -> None:
        async with sem:
            r = await client.upload_part(
                Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=n, Body=data[off : off + part]
            )
            parts.append({"PartNumber": n, "ETag": r["ETag"]})

    await asyncio.gather(*(one(i + 1, off) for i, off in enumerate(range(0, len(data), part))))
    parts.sort(key=lambda p: p["PartNumber"])
    await client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )


async def plain_download(client: Any, bucket: str, key: str, buf: bytearray, part: int, conc: int) -> None:
    sem = asyncio.Semaphore(conc)
    view = memoryview(buf)

    async def one(off: int) -> None:
        end = min(len(buf), off + part) - 1
        async with sem:
            r = await client.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{end}")
            async with r["Body"] as body:
                data = await body.read()
        view[off : off + len(data)] = data

    await asyncio.gather(*(one(off) for off in range(0, len(buf), part)))


async def interleaved(
    variants: dict[str, Callable[[], Awaitable[None]]], repeats: int, after: Callable[[], Awaitable[None]]
) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times, round-robin, so drift on a shared machine hits all alike."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            await fn()
            out[name].append(time.perf_counter() - t0)
            await after()
    return out


async def main(args: argparse.Namespace) -> None:
    size, part, conc = args.size_mib * MiB, args.part_mib * MiB, args.concurrency
    with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
        server = SeaweedServer(Path(tmp))
        server.start()
        try:
            bucket = server.create_bucket("bench")
            data = make_data(size)
            opts = server.options(part_concurrency=conc, read_range_size=part)
            st = S3Storage(f"s3://{bucket}", **opts)
            st_nocrc = S3Storage(f"s3://{bucket}", **opts, checksum=False)
            config = Config(
                retries={"total_max_attempts": 5, "mode": "standard"},
                max_pool_connections=max(10, 2 * conc),
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
            )
            async with get_session().create_client(
                "s3",
                endpoint_url=server.endpoint_url,
                aws_access_key_id=server.access_key,
                aws_secret_access_key=server.secret_key,
                region_name=server.region,
                config=config,
            ) as client:

                async def drop() -> None:
                    await client.delete_object(Bucket=bucket, Key="obj")

                async def keep() -> None:
                    return None

                await s3storage_upload(st, "obj", data, part, conc)  # warm-up: the store allocates volumes
                await drop()
                results = await interleaved(
                    {
                        "upload  S3Storage (CRC32C)": lambda: s3storage_upload(st, "obj", data, part, conc),
                        "upload  S3Storage (no checksum)": lambda: s3storage_upload(st_nocrc, "obj", data, part, conc),
                        "upload  plain aiobotocore": lambda: plain_upload(client, bucket, "obj", data, part, conc),
                    },
                    args.repeats,
                    drop,
                )
                await s3storage_upload(st, "obj", data, part, conc)
                buf, buf2 = bytearray(size), bytearray(size)
                results |= await interleaved(
                    {
                        "download S3Storage.read_into": lambda: st.read_into("obj", 0, memoryview(buf)),
                        "download plain aiobotocore": lambda: plain_download(client, bucket, "obj", buf2, part, conc),
                    },
                    args.repeats,
                    keep,
                )
                assert buf == data, "S3Storage download differs from the upload"
                assert buf2 == data, "plain download differs from the upload"
            await st.close()
            await st_nocrc.close()
        finally:
            server.kill()
    print(
        f"SeaweedFS weed mini on 127.0.0.1, object {args.size_mib} MiB, {args.part_mib} MiB parts/ranges, "
        f"{conc} in flight, median of {args.repeats} (MiB/s; runs in s)"
    )
    for name, runs in results.items():
        med = statistics.median(runs)
        print(f"  {name:34s} {args.size_mib / med:8.1f} MiB/s   runs: {', '.join(f'{r:.2f}' for r in runs)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--part-mib", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop (as the worker does)")
    a = p.parse_args()
    if a.uvloop:
        import uvloop

        uvloop.run(main(a))
    else:
        asyncio.run(main(a))
