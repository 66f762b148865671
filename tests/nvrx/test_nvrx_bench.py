"""bench/nvrx_blocking.py runs and reports every method it measured (tiny size)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_nvrx_blocking_bench_smoke(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("nvrx_blocking", ROOT / "bench" / "nvrx_blocking.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--size-mib", "2", "--tensor-mib", "1", "--reps", "1", "--methods", "nvrx-torch,torch-save",
                    "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved["methods"]) == {"nvrx-torch", "torch-save"} == set(out["methods"])
    assert all(r["blocked_median_s"] >= 0 and len(r["blocked_s"]) == 1 for r in saved["methods"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # its files are gone
