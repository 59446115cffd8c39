"""PNG plots: latency by percentile per scenario, and latency against coordinator count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from benchmarks.systems import BLPOP, PUBSUB, STREAMBUS, STREAMBUS_ACK, XREADGROUP, label

_PERCENTILE_TICKS = (0.0, 50.0, 90.0, 99.0, 99.9, 99.99)


def write_plots(doc: dict[str, Any], out: Path) -> list[str]:
    """Write the PNGs into ``out``; return their file names."""
    fanouts = [r for r in doc["results"] if r.get("workload") == "fanout" and "error" not in r]
    if not fanouts:
        return []
    names = []
    for name, draw in (("latency_distributions.png", _distributions),
                       ("latency_vs_coordinators.png", _versus_count)):
        figure = draw(fanouts, doc)
        figure.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(figure)
        names.append(name)
    return names


_COLORS = {STREAMBUS: "black", STREAMBUS_ACK: "tab:purple", XREADGROUP: "tab:orange",
           BLPOP: "tab:green", PUBSUB: "tab:red", "poll-100ms": "tab:blue",
           "poll-5s": "tab:gray"}


def _style(system: str) -> dict[str, Any]:
    color = _COLORS.get(system, "tab:cyan")
    if system == STREAMBUS:
        return {"linewidth": 2.6, "color": color, "zorder": 5}
    return {"linewidth": 1.4, "color": color}


def _x(percentile: float) -> float:
    """HDR-style axis: 1 / (1 - p), so the tail gets the room."""
    return 1.0 / max(1e-6, 1.0 - min(percentile, 99.9999) / 100.0)


def _distributions(fanouts: list[dict[str, Any]], doc: dict[str, Any]) -> Any:
    figure, axes = plt.subplots(1, len(fanouts), figsize=(6.2 * len(fanouts), 5.0),
                                squeeze=False)
    for ax, result in zip(axes[0], fanouts, strict=True):
        for name, system in result["systems"].items():
            curve = system.get("curve") or []
            if not curve:
                continue
            xs = [_x(p) for p, _ in curve]
            ys = [max(v, 1) / 1000 for _, v in curve]
            ax.step(xs, ys, where="post", label=label(name), **_style(name))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [_x(p) for p in _PERCENTILE_TICKS]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(
            lambda value, _pos: f"{100 * (1 - 1 / value):g}%"))
        ax.set_xlim(1, _x(99.99))
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency, ms (log)")
        processes, per = result["processes"], result["waiters_per_process"]
        ax.set_title(f"{result['title']}\n{processes} process{'es' if processes > 1 else ''}"
                     f" x {per:,} waiter{'s' if per > 1 else ''}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(text, handle)
    figure.legend(list(handles.values()), list(handles), loc="lower center",
                  ncol=min(4, len(handles)), fontsize=8, bbox_to_anchor=(0.5, -0.08))
    figure.suptitle(_subtitle(doc, "Signal latency by percentile (one signal, N waiters)"),
                    fontsize=10, y=1.06)
    return figure


def _versus_count(fanouts: list[dict[str, Any]], doc: dict[str, Any]) -> Any:
    figure, ax = plt.subplots(figsize=(8.5, 5.5))
    order = list(_COLORS)
    systems = sorted({name for r in fanouts for name in r["systems"]},
                     key=lambda s: (order.index(s) if s in order else len(order), s))
    for system in systems:
        points = sorted(((r["coordinators"], r["systems"][system]["latency"]) for r in fanouts
                         if system in r["systems"]
                         and r["systems"][system]["latency"].get("count")),
                        key=lambda point: point[0])
        if not points:
            continue
        xs = [n for n, _ in points]
        line = ax.plot(xs, [lat["p99_us"] / 1000 for _, lat in points], marker="o",
                       label=f"{label(system)} p99", **_style(system))[0]
        ax.plot(xs, [lat["p50_us"] / 1000 for _, lat in points], marker=".", linestyle="--",
                color=line.get_color(), linewidth=1.0, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("coordinators waiting for one signal (N)")
    ax.set_ylabel("latency, ms (log): p99 solid, p50 dashed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(_subtitle(doc, "Signal latency vs coordinator count"), fontsize=10)
    return figure


def _subtitle(doc: dict[str, Any], what: str) -> str:
    machine, server = doc["machine"], doc["server"]
    return (f"{what}\n{machine['usable_cpus']} CPUs, Python {machine['python']}, "
            f"{server['name']} {server['version']}, preset {doc['harness']['preset']}, "
            f"load at start {doc['harness']['load_average_start'][0]:.2f}")
