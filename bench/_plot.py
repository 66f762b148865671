"""The PNG of bench/run.py --plot: blocked/durable bars per engine and the training-loop timeline."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_COLORS = {
    "torch_save": "#7f7f7f",
    "dcp_save": "#8c564b",
    "dcp_async_thread": "#ff7f0e",
    "dcp_async_process": "#d62728",
    "nvre_async": "#9467bd",
    "asyncckpt_save": "#1f77b4",
    "asyncckpt_torch": "#17becf",
    "asyncckpt_dcp": "#2ca02c",
}


def plot(res: dict[str, Any], path: str) -> None:
    """Write the figure for one bench result (the dict bench/run.py writes as JSON)."""
    train = res.get("train")
    nrows = 2 if train else 1
    fig, axes = plt.subplots(nrows, 1, figsize=(12, 5.5 * nrows), squeeze=False)
    ax = axes[0][0]
    eng = [(n, r) for n, r in res["engines"].items() if r.get("available")]
    names = [r["label"] for _n, r in eng]
    x = list(range(len(eng)))
    w = 0.38
    for off, key, title, alpha in ((-w / 2, "blocked_s", "blocked (training loop stalls)", 1.0),
                                   (w / 2, "durable_s", "durable (fsync'ed / committed)", 0.45)):
        med = [r[key]["median"] for _n, r in eng]
        lo = [r[key]["median"] - r[key]["min"] for _n, r in eng]
        hi = [r[key]["max"] - r[key]["median"] for _n, r in eng]
        ax.bar([i + off for i in x], med, w, yerr=[lo, hi], capsize=3, label=title, alpha=alpha,
               color=[_COLORS.get(n, "#333333") for n, _r in eng], edgecolor="black", linewidth=0.5)
        for i, m in enumerate(med):
            ax.text(i + off, m, f"{m:.2f}" if m >= 0.01 else f"{m * 1e3:.1f}ms", ha="center", va="bottom", fontsize=7)
    lim = res["limits"]
    if lim["memcpy_s"]["median"]:
        ax.axhline(lim["memcpy_s"]["median"], color="green", ls="--", lw=1,
                   label=f"memcpy floor {lim['memcpy_s']['median']:.3f} s")
    if lim["disk_s"]["median"]:
        what = "raw S3 upload" if res["meta"].get("s3") else "raw pwrite+fsync"
        ax.axhline(lim["disk_s"]["median"], color="red", ls=":", lw=1, label=f"{what} {lim['disk_s']['median']:.3f} s")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("seconds per save (median, bars: min-max)")
    meta = res["meta"]
    ax.set_title(f"{meta['nbytes'] / (1 << 20):.0f} MiB state ({meta['tensors']} x {meta['dtype']}), "
                 f"{meta['reps']} reps, {meta['cpus']} CPUs, torch {meta['torch']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    unavailable = [r["label"] for r in res["engines"].values() if not r.get("available")]
    if unavailable:
        ax.text(1.0, -0.22, "not run: " + ", ".join(unavailable) + " (see JSON for why)", transform=ax.transAxes,
                ha="right", fontsize=7, color="#555555")
    if train:
        ax2 = axes[1][0]
        base = train["baseline"]
        ax2.plot([t * 1e3 for t in base["step_s"]], color="black", lw=0.8, label="no checkpointing")
        for n, r in train["engines"].items():
            c = _COLORS.get(n, None)
            ax2.plot([t * 1e3 for t in r["step_s"]], lw=0.8, color=c,
                     label=f"{r['label']} ({r['inflation_pct']:+.1f} %)")
            for s in r["save_steps"]:
                ax2.plot([s], [r["step_s"][s] * 1e3], marker="v", color=c, ms=6)
        for s in range(train["every"], train["steps"], train["every"]):
            ax2.axvline(s, color="#999999", ls=":", lw=0.8)
        ax2.set_yscale("log")
        ax2.set_xlabel("training step (dotted lines / triangles: a save starts)")
        ax2.set_ylabel("step time, ms (log)")
        ax2.set_title(f"training loop: {train['params'] / 1e6:.1f} M params + Adam = {train['state_mib']:.0f} MiB state, "
                      f"save every {train['every']} steps; inflation vs no checkpointing", fontsize=10)
        ax2.legend(fontsize=7, ncol=2, loc="upper right")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
