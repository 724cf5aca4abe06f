"""Reports of measured Results: a printed table, JSON, a markdown table for the README, PNG charts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .contenders import BASELINES
from .harness import Result

ONE_OFF = "set-up plus the untimed first window: compiling, capturing, tracing"
Sweeps = dict[str, list[Result]]  # swept quantity -> one Result per value


def number(value: float) -> str:
    """Three significant digits, thousands separated: 1,234,567 / 12,300 / 45.6 / 0.123."""
    if value >= 1000:
        return f"{float(f'{value:.3g}'):,.0f}"
    return f"{value:.3g}"


def _ratio(row: dict) -> str:
    return "" if row.get("vs_eager") is None else f"{row['vs_eager']:.2f}x"


def table(results: Sequence[Result]) -> str:
    """The detailed plain-text table: every contender of every workload, with its spread or skip reason."""
    w = max([16] + [len(o.contender) for r in results for o in r.outcomes])
    head = f"{'contender':<{w}} {'steps/s':>9} {'min-max':>17} {'samples/s':>10} {'vs eager':>8} {'loss':>8}"
    lines = []
    for result in results:
        point = f" [{result.param[0]} {result.param[1]}]" if result.param else ""
        size = f"batch {result.batch_size}, {result.steps} steps/window"
        lines += ["", f"{result.workload}{point}: {result.title}, {size}"]
        lines += [head, "-" * len(head)]
        for row in result.rows():
            if row["skipped"]:
                lines.append(f"{row['contender']:<{w}} skipped: {row['skipped']}")
                continue
            rate, samples = row["steps_per_sec"], row["samples_per_sec"]
            spread = f"{number(rate['min'])}-{number(rate['max'])}"
            loss = "nan" if row["loss"] is None else f"{row['loss']:.4g}"
            lines.append(
                f"{row['contender']:<{w}} {number(rate['median']):>9} {spread:>17} "
                f"{number(samples['median']):>10} {_ratio(row):>8} {loss:>8}"
            )
    return "\n".join(lines[1:])


def to_json(results: Sequence[Result], sweeps: Sweeps, env: dict) -> dict:
    return {
        "environment": env,
        "baseline": f"the faster of {' and '.join(BASELINES)}, per workload",
        "workloads": [r.to_dict() for r in results],
        "sweeps": {name: [r.to_dict() for r in points] for name, points in sweeps.items()},
    }


def write_json(path: Path, results: Sequence[Result], sweeps: Sweeps, env: dict) -> None:
    path.write_text(json.dumps(to_json(results, sweeps, env), indent=1) + "\n")


def environment_line(env: dict) -> str:
    threads = f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}"
    return (
        f"Measured {env['date']} on {env['device_name']} ({env['cpu_count']} logical CPUs), "
        f"device `{env['device']}`, torch {env['torch']}, {threads}, "
        f"Python {env['python']}, hotloop {env['hotloop']}."
    )


def _columns(results: Sequence[Result]) -> list[str]:
    """Contenders that ran somewhere, in contender order."""
    names = [o.contender for o in results[0].outcomes] if results else []
    return [n for n in names if any(o.contender == n and o.times for r in results for o in r.outcomes)]


def _grid(results: Sequence[Result], first: list[str], label: list[str], key: str) -> list[str]:
    columns = _columns(results)
    lines = ["| " + " | ".join(first + columns) + " |", "|" + "---|" * (len(first) + len(columns))]
    for result, head in zip(results, label, strict=True):
        rows = {row["contender"]: row for row in result.rows()}
        cells = []
        for name in columns:
            row = rows.get(name)
            if row is None or row["skipped"]:
                cells.append("—")
            else:
                ratio = f" ({_ratio(row)})" if row.get("vs_eager") else ""
                cells.append(f"{number(row[key]['median'])}{ratio}")
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return lines


def _one_off(results: Sequence[Result]) -> list[str]:
    """Seconds of set-up plus the untimed first window (compilation, capture, tracing), per contender."""
    columns = _columns(results)
    lines = ["| workload | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for result in results:
        rows = {row["contender"]: row for row in result.rows()}
        cells = [
            "—"
            if rows[n]["skipped"] or rows[n]["setup_seconds"] is None
            else f"{rows[n]['setup_seconds']:.2g}"
            for n in columns
        ]
        lines.append(f"| {result.workload} | " + " | ".join(cells) + " |")
    return lines


def _skips(results: Sequence[Result]) -> list[str]:
    """One line per (contender, reason), naming the workloads and sweep points it applies to."""
    seen: dict[tuple[str, str], list[str]] = {}
    everywhere = [_label(r) for r in results]
    for result in results:
        for o in result.outcomes:
            if o.skipped:
                seen.setdefault((o.contender, o.skipped), []).append(_label(result))
    return [
        f"- **{c}** skipped {'everywhere' if ws == everywhere else 'on ' + ', '.join(ws)}: {reason}"
        for (c, reason), ws in seen.items()
    ]


def _label(result: Result) -> str:
    return result.workload if result.param is None else f"{result.param[0]} {result.param[1]}"


def markdown(results: Sequence[Result], sweeps: Sweeps, env: dict) -> str:
    """The README section: steps/s per workload and contender, ratio to the eager loop, then the sweeps."""
    out = [
        environment_line(env),
        "",
        "Steps per second, median of the timed windows (x = speed-up over the faster of the two eager "
        "loops on that row, plain or fused optimizer):",
        "",
    ]
    if results:
        labels = [f"{r.title} | {r.batch_size}" for r in results]
        out += _grid(results, ["workload", "batch"], labels, "steps_per_sec")
        out += ["", f"Seconds before timing starts ({ONE_OFF}), not part of any rate above:", ""]
        out += _one_off(results)
    for name, points in sweeps.items():
        first = points[0]
        fixed = f"{first.steps} steps per window" if name == "batch size" else f"batch {first.batch_size}"
        out += ["", f"Samples per second as the {name} grows; {first.title}, {fixed}:", ""]
        out += _grid(points, [name], [str(p.param[1]) for p in points], "samples_per_sec")
    skips = _skips(list(results) + [p for points in sweeps.values() for p in points])
    if skips:
        out += ["", *skips]
    return "\n".join(out) + "\n"


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def bar_chart(path: Path, results: Sequence[Result], env: dict) -> bool:
    """Grouped bars of steps/s (log scale) with min-max whiskers; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None or not results:
        return False
    columns = _columns(results)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(results)), 5))
    width = 0.8 / max(len(columns), 1)
    for i, name in enumerate(columns):
        xs, ys, low, high = [], [], [], []
        for j, result in enumerate(results):
            row = next(r for r in result.rows() if r["contender"] == name)
            if row["skipped"]:
                continue
            rate = row["steps_per_sec"]
            xs.append(j + (i - (len(columns) - 1) / 2) * width)
            ys.append(rate["median"])
            low.append(rate["median"] - rate["min"])
            high.append(rate["max"] - rate["median"])
        ax.bar(xs, ys, width, yerr=[low, high], capsize=2, label=name)
    ax.set_yscale("log")
    ax.set_xticks(range(len(results)), [f"{r.workload}\nbatch {r.batch_size}" for r in results])
    ax.set_ylabel("optimizer steps per second (log)")
    ax.set_title(
        f"training loops on {env['device_name']}, torch {env['torch']}, {env['threads']} thread(s)",
        fontsize=9,
    )
    ax.legend(fontsize=8, ncols=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def sweep_chart(path: Path, sweeps: Sweeps, env: dict) -> bool:
    """Per sweep: samples/s (log-log) above the speed-up over the eager loop; False without matplotlib."""
    plt = pyplot()
    if plt is None or not sweeps:
        return False
    fig, axes = plt.subplots(2, len(sweeps), figsize=(6 * len(sweeps), 7), squeeze=False, sharex="col")
    for column, (name, points) in enumerate(sweeps.items()):
        rate, ratio = axes[0][column], axes[1][column]
        for contender in _columns(points):
            rows = [(p.param[1], row) for p in points for row in p.rows()]
            ran = [(x, row) for x, row in rows if row["contender"] == contender and not row["skipped"]]
            xs = [x for x, _ in ran]
            rate.plot(xs, [row["samples_per_sec"]["median"] for _, row in ran], marker="o", label=contender)
            ratio.plot(xs, [row["vs_eager"] or float("nan") for _, row in ran], marker="o", label=contender)
        rate.set_yscale("log")
        rate.set_ylabel("samples per second (log)")
        rate.set_title(points[0].title, fontsize=9)
        rate.legend(fontsize=8)
        ratio.set_xscale("log", base=2)
        ratio.set_xlabel(name)
        ratio.set_ylabel("speed-up over the faster eager loop")
        ratio.axhline(1.0, color="grey", linewidth=0.8)
        for ax in (rate, ratio):
            ax.grid(which="both", alpha=0.3)
    fig.suptitle(f"{env['device_name']}, torch {env['torch']}, {env['threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
