"""Benchmark CLI: every workload x every contender, then the scaling sweeps; writes bench/out/results.*.

PYTHONPATH=python python bench/run.py --quick            # about 2 minutes on a small CPU
PYTHONPATH=python python bench/run.py                    # the full run behind the README table
PYTHONPATH=python python bench/run.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import report, workloads
from bench.contenders import CONTENDERS, SWEEP, select
from bench.harness import Result, environment, measure

SWEEPS = {"batch": ("batch size", workloads.batch_sweep), "width": ("hidden width", workloads.width_sweep)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="shorter windows, fewer repetitions and sweep points")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--workloads", help=f"comma-separated subset of: {','.join(workloads.standard())} (or none)"
    )
    names = ", ".join(c.name for c in CONTENDERS)
    p.add_argument("--contenders", help=f"comma-separated subset of: {names} (case and punctuation ignored)")
    p.add_argument("--sweep", choices=("all", "batch", "width", "none"), default="all", help="scaling sweeps")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 on CPU, torch's default on CUDA)")
    p.add_argument("--repetitions", type=int, help="timed windows per contender (default: 3 quick, 15 full)")
    p.add_argument("--warmup", type=int, default=1, help="untimed windows per contender first (default: 1)")
    p.add_argument("--no-charts", action="store_true", help="write no PNG charts (JSON and markdown only)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="output folder")
    return p.parse_args(argv)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def plan(args: argparse.Namespace) -> tuple[list[workloads.Workload], dict[str, list[workloads.Workload]]]:
    """The headline workloads and the sweeps the arguments ask for."""
    standard = workloads.standard(quick=args.quick)
    names = _names(args.workloads)
    if names is None:
        chosen = list(standard.values())
    else:
        unknown = [n for n in names if n not in standard and n != "none"]
        if unknown:
            raise SystemExit(f"unknown workload(s) {unknown}; choose from {list(standard)}")
        chosen = [standard[n] for n in names if n != "none"]
    kinds = (
        SWEEPS if args.sweep == "all" else {} if args.sweep == "none" else {args.sweep: SWEEPS[args.sweep]}
    )
    return chosen, {label: make(quick=args.quick) for label, make in kinds.values()}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    repetitions = args.repetitions or (3 if args.quick else 15)
    contenders = select(_names(args.contenders))
    sweep_contenders = [c for c in contenders if c.name in SWEEP]
    chosen, sweeps = plan(args)
    env = environment(device)
    print(report.environment_line(env), flush=True)

    started = time.perf_counter()

    def run(w: workloads.Workload, among) -> Result:
        label = f"{w.title}" + (f" [{w.param[0]} {w.param[1]}]" if w.param else "")
        print(f"{label}: batch {w.batch_size}, {w.steps} steps x {repetitions} windows", flush=True)
        began = time.perf_counter()
        result = measure(w, among, device, repetitions=repetitions, warmup=args.warmup, log=print)
        print(f"  {time.perf_counter() - began:.1f} s", flush=True)
        return result

    results: list[Result] = []
    swept: dict[str, list[Result]] = {}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every workload: a run stopped by a time limit keeps what it measured
        env["seconds"] = round(time.perf_counter() - started, 1)
        report.write_json(args.out / "results.json", results, swept, env)
        (args.out / "results.md").write_text(report.markdown(results, swept, env))

    for w in chosen:
        results.append(run(w, contenders))
        save()
    for label, points in sweeps.items():
        for w in points:
            swept.setdefault(label, []).append(run(w, sweep_contenders))
            save()
    save()

    print("\n" + report.environment_line(env) + "\n")
    print(report.table(results + [p for points in swept.values() for p in points]))
    written = ["results.json", "results.md"]
    charts = () if args.no_charts else (
        ("results.png", lambda p: report.bar_chart(p, results, env)),
        ("sweeps.png", lambda p: report.sweep_chart(p, swept, env)),
    )  # fmt: skip
    for name, draw in charts:
        if draw(args.out / name):
            written.append(name)
    if charts and report.pyplot() is None:
        print("matplotlib is not installed: no PNG charts (pip install matplotlib)")
    print(f"\n{env['seconds']:.0f} s; wrote {', '.join(written)} to {args.out}")
    return report.to_json(results, swept, env)


if __name__ == "__main__":
    main()
