"""Our GCS and Azure Blob backends vs the plain client libraries: upload and download throughput of one object.

Starts fake-gcs-server and Azurite on 127.0.0.1 (as the tests do), then, per emulator, times
``--repeats`` runs of each variant, interleaved (so drift on a shared machine hits all alike),
and prints the medians and the ratio ours / plain:

- GCS upload:    GCSStorage writer (16 MiB parts as temporary objects, 8 concurrent write_part calls,
                 CRC32C sent) vs gcloud-aio-storage ``upload`` of the same parts with the same
                 concurrency + ``compose`` (a two-level tree: 32 sources per request);
- GCS download:  GCSStorage.read_into (16 MiB ranges, 8 in flight) vs gcloud-aio-storage ``download``
                 with the same Range headers and concurrency, copied into one buffer;
- Azure upload:  AzureBlobStorage writer (Put Block per part, 8 concurrent) vs azure-storage-blob
                 ``stage_block`` x N with the same concurrency + ``commit_block_list``;
- Azure download: AzureBlobStorage.read_into vs ``download_blob(offset, length).readall()`` per range.

Run from the repository root:  python bench/storage_throughput.py [--size-mib 1024] [--repeats 3] [--only gcs|azure]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncckpt.format import checksum
from asyncckpt.storage import Storage, open_storage
from tests.object_servers import AzuriteServer, FakeGcsServer

MiB = 1024 * 1024


def make_data(size: int) -> bytes:
    block = os.urandom(16 * MiB)
    out = bytearray(size)
    for off in range(0, size, len(block)):
        out[off : off + len(block)] = block[: size - off]
        out[off : off + 8] = off.to_bytes(8, "big")  # no two parts alike
    return bytes(out)


async def ours_upload(st: Storage, key: str, data: bytes, part: int, conc: int) -> None:
    """As the engine does: a bounded number of parts in flight, each with the CRC32C it computed."""
    view = memoryview(data)
    w = await st.open_writer(key, size_hint=len(data))
    sem = asyncio.Semaphore(conc)

    async def one(i: int, off: int) -> None:
        async with sem:
            chunk = view[off : off + part]
            crc = await asyncio.to_thread(checksum, chunk)
            await w.write_part(i, off, chunk, crc32c=crc)

    await asyncio.gather(*(one(i, off) for i, off in enumerate(range(0, len(data), part))))
    await w.commit()


async def interleaved(
    variants: dict[str, Callable[[], Awaitable[None]]], repeats: int, after: Callable[[], Awaitable[None]]
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            await fn()
            out[name].append(time.perf_counter() - t0)
            await after()
    return out


# ---------------------------------------------------------------------------- GCS


async def gcs_plain_upload(client: Any, bucket: str, key: str, data: bytes, part: int, conc: int) -> None:
    sem = asyncio.Semaphore(conc)
    names = [f"{key}.plain-part-{i:05d}" for i in range(-(-len(data) // part))]

    async def one(i: int) -> None:
        async with sem:
            off = i * part
            await client.upload(
                bucket, names[i], data[off : off + part], content_type="application/octet-stream", timeout=300
            )

    await asyncio.gather(*(one(i) for i in range(len(names))))
    sources, level, temps = names, 0, list(names)
    while len(sources) > 32:
        groups = [sources[i : i + 32] for i in range(0, len(sources), 32)]
        mids = [f"{key}.plain-c{level}-{j}" for j in range(len(groups))]
        await asyncio.gather(*(client.compose(bucket, m, g, timeout=300) for m, g in zip(mids, groups)))
        temps += mids
        sources, level = mids, level + 1
    await client.compose(bucket, key, sources, timeout=300)
    await asyncio.gather(*(client.delete(bucket, n, timeout=300) for n in temps))


async def gcs_plain_download(client: Any, bucket: str, key: str, buf: bytearray, part: int, conc: int) -> None:
    sem = asyncio.Semaphore(conc)
    view = memoryview(buf)

    async def one(off: int) -> None:
        end = min(len(buf), off + part) - 1
        async with sem:
            data = await client.download(bucket, key, headers={"Range": f"bytes={off}-{end}"}, timeout=300)
        view[off : off + len(data)] = data

    await asyncio.gather(*(one(off) for off in range(0, len(buf), part)))


async def bench_gcs(tmp: Path, data: bytes, part: int, conc: int, repeats: int) -> dict[str, list[float]]:
    from gcloud.aio.storage import Storage as GcsClient

    server = FakeGcsServer(tmp / "gcs")
    server.start()
    try:
        bucket = server.create_bucket()
        st = open_storage(f"gs://{bucket}", **server.options(part_concurrency=conc, read_range_size=part, read_timeout=300))
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(10, 2 * conc))) as session:
            client = GcsClient(session=session, api_root=server.endpoint_url)

            async def drop() -> None:
                await st.delete("obj")

            async def keep() -> None:
                return None

            await ours_upload(st, "obj", data, part, conc)  # warm-up
            await drop()
            results = await interleaved(
                {
                    "gcs upload   GCSStorage": lambda: ours_upload(st, "obj", data, part, conc),
                    "gcs upload   gcloud-aio-storage": lambda: gcs_plain_upload(client, bucket, "obj", data, part, conc),
                },
                repeats,
                drop,
            )
            await ours_upload(st, "obj", data, part, conc)
            buf, buf2 = bytearray(len(data)), bytearray(len(data))
            results |= await interleaved(
                {
                    "gcs download GCSStorage.read_into": lambda: st.read_into("obj", 0, memoryview(buf)),
                    "gcs download gcloud-aio-storage": lambda: gcs_plain_download(client, bucket, "obj", buf2, part, conc),
                },
                repeats,
                keep,
            )
            assert buf == data and buf2 == data, "a download differs from the upload"
        await st.close()
    finally:
        server.stop()
    return results


# ---------------------------------------------------------------------------- Azure


async def az_plain_upload(container: Any, key: str, data: bytes, part: int, conc: int) -> None:
    from azure.storage.blob import BlobBlock

    blob = container.get_blob_client(key)
    sem = asyncio.Semaphore(conc)
    ids = [base64.b64encode(f"plain-{i:08d}".encode()).decode() for i in range(-(-len(data) // part))]

    async def one(i: int) -> None:
        async with sem:
            off = i * part
            await blob.stage_block(ids[i], data[off : off + part])

    await asyncio.gather(*(one(i) for i in range(len(ids))))
    await blob.commit_block_list([BlobBlock(i) for i in ids])


async def az_plain_download(container: Any, key: str, buf: bytearray, part: int, conc: int) -> None:
    blob = container.get_blob_client(key)
    sem = asyncio.Semaphore(conc)
    view = memoryview(buf)

    async def one(off: int) -> None:
        n = min(len(buf), off + part) - off
        async with sem:
            data = await (await blob.download_blob(offset=off, length=n, max_concurrency=1)).readall()
        view[off : off + len(data)] = data

    await asyncio.gather(*(one(off) for off in range(0, len(buf), part)))


async def bench_azure(tmp: Path, data: bytes, part: int, conc: int, repeats: int) -> dict[str, list[float]]:
    from azure.storage.blob.aio import BlobServiceClient

    server = AzuriteServer(tmp / "azurite")
    server.start()
    try:
        container = server.create_container()
        st = open_storage(f"az://{container}", **server.options(part_concurrency=conc, read_range_size=part, read_timeout=300))
        async with BlobServiceClient.from_connection_string(
            server.connection_string(), max_single_get_size=4 * MiB, max_chunk_get_size=4 * MiB
        ) as svc:
            cc = svc.get_container_client(container)

            async def drop() -> None:
                await st.delete("obj")

            async def keep() -> None:
                return None

            await ours_upload(st, "obj", data, part, conc)  # warm-up
            await drop()
            results = await interleaved(
                {
                    "azure upload   AzureBlobStorage": lambda: ours_upload(st, "obj", data, part, conc),
                    "azure upload   azure-storage-blob": lambda: az_plain_upload(cc, "obj", data, part, conc),
                },
                repeats,
                drop,
            )
            await ours_upload(st, "obj", data, part, conc)
            buf, buf2 = bytearray(len(data)), bytearray(len(data))
            results |= await interleaved(
                {
                    "azure download AzureBlobStorage.read_into": lambda: st.read_into("obj", 0, memoryview(buf)),
                    "azure download azure-storage-blob": lambda: az_plain_download(cc, "obj", buf2, part, conc),
                },
                repeats,
                keep,
            )
            assert buf == data and buf2 == data, "a download differs from the upload"
        await st.close()
    finally:
        server.stop()
    return results


async def main(args: argparse.Namespace) -> None:
    size, part, conc = args.size_mib * MiB, args.part_mib * MiB, args.concurrency
    data = make_data(size)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="storagebench-") as tmp:
        if args.only in (None, "gcs"):
            results |= await bench_gcs(Path(tmp), data, part, conc, args.repeats)
        if args.only in (None, "azure"):
            results |= await bench_azure(Path(tmp), data, part, conc, args.repeats)
    print(
        f"object {args.size_mib} MiB, {args.part_mib} MiB parts/ranges, {conc} in flight, "
        f"median of {args.repeats} (MiB/s; runs in s); load average {os.getloadavg()[0]:.2f}"
    )
    names = list(results)
    for name in names:
        med = statistics.median(results[name])
        print(f"  {name:44s} {args.size_mib / med:8.1f} MiB/s   runs: {', '.join(f'{r:.2f}' for r in results[name])}")
    for ours, plain in zip(names[::2], names[1::2]):
        ratio = statistics.median(results[plain]) / statistics.median(results[ours])
        print(f"  ratio ours/plain  {ours.split()[0]:5s} {ours.split()[1]:8s} {ratio:5.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--part-mib", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["gcs", "azure"])
    asyncio.run(main(p.parse_args()))
