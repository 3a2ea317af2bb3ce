"""What ``moe-sim`` writes: ``results.csv`` (one row per scenario), ``results.json`` (everything, per-image latencies
included), a summary table on stdout (per strategy, averaged over seeds), and four PNG plots (matplotlib, Agg):
latency CDF per strategy, energy per image per site, bytes per image, battery lifetime."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from moevit.sim.config import ALL_STRATEGIES as STRATEGIES
from moevit.sim.engine import ScenarioResult

__all__ = ["MAX_FACETS", "plot_results", "summary_rows", "summary_table", "write_results"]

MAX_FACETS = 12


def _clean(v: Any) -> Any:
    """JSON has no inf/nan: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        return _clean(v.item())
    return v


def write_results(out: Path, results: Sequence[ScenarioResult], meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.json`` under ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    json_path = out / "results.json"
    doc = {"meta": _clean(dict(meta)), "scenarios": [_clean(r.to_json()) for r in results]}
    json_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return csv_path, json_path


def _setting(r: ScenarioResult) -> str:
    p = r.params
    return f"{p['topology']}/{p['condition']}/{p['arrival']}/{p['failures']}"


def _strategy_order(results: Sequence[ScenarioResult]) -> list[str]:
    present = {r.params["strategy"] for r in results}
    return [s for s in STRATEGIES if s in present]


def summary_rows(results: Sequence[ScenarioResult]) -> list[dict[str, Any]]:
    """Per setting (topology/condition/arrival/failures) and strategy, averaged over seeds."""
    groups: dict[tuple[str, str], list[ScenarioResult]] = defaultdict(list)
    for r in results:
        if r.error is None:
            groups[(_setting(r), r.params["strategy"])].append(r)
    order = {s: i for i, s in enumerate(STRATEGIES)}
    out = []
    for (setting, strategy), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        arrived = sum(r.arrived for r in rs)
        lat = np.concatenate([np.asarray(r.latencies_s) for r in rs]) if rs else np.array([])
        coord_life = []
        for r in rs:
            lifes = [s.lifetime_h for s in r.sites.values() if s.lifetime_h is not None]
            if lifes:
                coord_life.append(min(lifes))
        out.append({
            "setting": setting, "strategy": strategy, "seeds": len(rs),
            "latency_mean_ms": float(lat.mean() * 1e3) if len(lat) else math.nan,
            "latency_p95_ms": float(np.percentile(lat, 95) * 1e3) if len(lat) else math.nan,
            "failed_pct": 100.0 * sum(r.failed for r in rs) / max(arrived, 1),
            "degraded_pct": 100.0 * sum(r.degraded for r in rs) / max(arrived, 1),
            "kb_per_image": float(np.mean([r.bytes_per_image for r in rs])) / 1e3,
            "active_mj_per_image": float(np.mean([sum(s.active_j_per_image for s in r.sites.values())
                                                  for r in rs])) * 1e3,
            "min_lifetime_h": float(np.mean(coord_life)) if coord_life else math.nan,
        })
    return out


def summary_table(results: Sequence[ScenarioResult]) -> str:
    rows = summary_rows(results)
    head = (f"{'setting':<44} {'strategy':<23} {'mean ms':>9} {'p95 ms':>9} {'fail %':>7} {'degr %':>7} "
            f"{'kB/img':>8} {'act mJ/img':>10} {'min life h':>10}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['setting'][:44]:<44} {r['strategy']:<23} {r['latency_mean_ms']:>9.1f} "
                     f"{r['latency_p95_ms']:>9.1f} {r['failed_pct']:>7.1f} {r['degraded_pct']:>7.1f} "
                     f"{r['kb_per_image']:>8.2f} {r['active_mj_per_image']:>10.2f} {r['min_lifetime_h']:>10.1f}")
    misfits = {(r.params["strategy"], r.error) for r in results if r.error and r.error.startswith("does not fit")}
    for strategy, why in sorted(misfits):  # a deployment fact, not a failure: said once per strategy
        lines.append(f"{strategy} not simulated: {why}")
    errors = [r for r in results if r.error is not None and not r.error.startswith("does not fit")]
    if errors:
        lines.append(f"{len(errors)} scenario(s) failed to run:")
        lines += [f"  {r.params['id']}: {r.error}" for r in errors]
    return "\n".join(lines)


def _facets(results: Sequence[ScenarioResult]) -> tuple[list[str], dict[str, list[ScenarioResult]], int]:
    by: dict[str, list[ScenarioResult]] = defaultdict(list)
    for r in results:
        if r.error is None:
            by[_setting(r)].append(r)
    names = list(by)
    return names[:MAX_FACETS], by, len(names)


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, max(1, n))
    return math.ceil(n / cols), cols


def plot_results(out: Path, results: Sequence[ScenarioResult]) -> list[Path]:
    """The four PNG plots; one panel per setting (at most :data:`MAX_FACETS`, the rest named in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    names, by, total = _facets(results)
    if not names:
        return []
    strategies = _strategy_order(results)
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(STRATEGIES)}
    more = f" (first {len(names)} of {total} settings)" if total > len(names) else ""
    rows, cols = _grid(len(names))
    paths = []

    def figure(title: str) -> tuple[Any, np.ndarray]:
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
        fig.suptitle(title + more, fontsize=11)
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        return fig, axes

    def save(fig: Any, name: str) -> None:
        handles, labels = [], []
        for ax in fig.axes:  # one legend for the figure, below the panels, out of the bars' way
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    # latency CDF per strategy
    fig, axes = figure("Latency per image (arrival to result), CDF over images and seeds")
    for ax, setting in zip(axes.flat, names, strict=False):
        for s in strategies:
            lat = np.sort(np.concatenate([np.asarray(r.latencies_s) for r in by[setting]
                                          if r.params["strategy"] == s] or [np.array([])]))
            if len(lat):
                ax.step(lat * 1e3, np.arange(1, len(lat) + 1) / len(lat), where="post", label=s, color=colors[s])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of images")
        ax.set_title(setting, fontsize=8)
        ax.grid(alpha=0.3)
    save(fig, "latency_cdf.png")

    def grouped(ax: Any, setting: str, value: Any, sites: list[str], log: bool = False, stack_idle: bool = False
                ) -> None:
        width = 0.8 / max(1, len(strategies))
        seen: list[float] = []
        for k, s in enumerate(strategies):
            rs = [r for r in by[setting] if r.params["strategy"] == s]
            if not rs:
                continue
            x = np.arange(len(sites)) + k * width
            vals = np.array([np.mean([value(r, site) for r in rs]) for site in sites], dtype=float)
            seen += [v for v in vals if np.isfinite(v) and v > 0]
            ax.bar(x, vals, width, label=s, color=colors[s])
            if stack_idle:
                idle = np.array([np.mean([r.sites[site].idle_j / max(r.arrived, 1) for r in rs]) for site in sites])
                ax.bar(x, idle, width, bottom=vals, color=colors[s], alpha=0.35, hatch="//")
        ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2)
        ax.set_xticklabels(sites, fontsize=7)
        if log and seen and max(seen) > 20 * min(seen):  # a log axis only when the values span orders of magnitude
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(setting, fontsize=8)
        ax.grid(alpha=0.3, axis="y")

    fig, axes = figure("Energy per image per site: active (compute + radio), hatched: idle share")
    for ax, setting in zip(axes.flat, names, strict=False):
        sites = list(by[setting][0].sites)
        grouped(ax, setting, lambda r, site: r.sites[site].active_j_per_image, sites, stack_idle=True)
        ax.set_ylabel("J per image")
    save(fig, "energy_per_image.png")

    fig, axes = figure("Bytes on the links per image (both ways, protocol overhead included)")
    for ax, setting in zip(axes.flat, names, strict=False):
        vals = [np.mean([r.bytes_per_image for r in by[setting] if r.params["strategy"] == s] or [0.0])
                for s in strategies]
        ax.bar(range(len(strategies)), np.array(vals) / 1e3, color=[colors[s] for s in strategies])
        ax.set_xticks(range(len(strategies)))
        ax.set_xticklabels(strategies, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("kB per image")
        ax.set_title(setting, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    save(fig, "bytes_per_image.png")

    fig, axes = figure("Battery lifetime per site at the simulated load (hours; mains sites left out)")
    for ax, setting in zip(axes.flat, names, strict=False):
        sites = [s for s, v in by[setting][0].sites.items() if v.battery_wh is not None]
        if not sites:
            ax.text(0.5, 0.5, "no battery-powered site", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(setting, fontsize=8)
            continue
        grouped(ax, setting, lambda r, site: r.sites[site].lifetime_h or math.nan, sites, log=True)
        ax.set_ylabel("hours")
    save(fig, "battery_lifetime.png")
    return paths
