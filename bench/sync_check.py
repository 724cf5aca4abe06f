"""Counts the host-device synchronisations in one window of the graph engine (DESIGN contract 7: one).

Two independent counts per window, after the capturing first window:
- the profiler's CUDA runtime calls that block the host (``cudaStreamSynchronize``,
  ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, plain ``cudaMemcpy``);
- the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` (syncs that torch's own ops make).

Windows of 32 and 256 steps: a count that does not grow with the steps is per window, not per step.

    PYTHONPATH=build/gpu/pkg python3 bench/sync_check.py --out sync.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
SHOWN = ("cudaMemcpyAsync", "cudaGraphLaunch", "cudaLaunchKernel")  # counted to show the window's shape


def _runtime_calls(events) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in events:
        if e.name in BLOCKING or e.name in SHOWN:
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def count(every: int, windows: int = 3, engine: str = "graph") -> dict:
    import hotloop

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(every * 32, 16, generator=g).cuda(), torch.randn(every * 32, 1, generator=g).cuda()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = hotloop.fit((x, y), model, optimizer, nn.MSELoss(), batch_size=32, every=every, engine=engine)
    first = next(stream)  # warm-up steps and the capture happen here: not counted
    torch.cuda.synchronize()
    per_window = []
    for _ in range(windows):
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    event = next(stream)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        calls = _runtime_calls(prof.events())
        per_window.append(
            {
                "engine": event["engine"],
                "steps": every,
                "runtime_calls": calls,
                "blocking_total": sum(n for name, n in calls.items() if name in BLOCKING),
                "sync_debug_warnings": sum("synchroniz" in str(w.message) for w in caught),
                "train_loss": event["train_loss"],
            }
        )
    stream.close()
    return {"engine": first["engine"], "every": every, "windows": per_window}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        report = {"skipped": "no CUDA device: torch.cuda.is_available() is False"}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(report["skipped"])
        return 0
    runs = [count(every) for every in (32, 256)]
    totals = {r["every"]: [w["blocking_total"] for w in r["windows"]] for r in runs}
    engines = {w["engine"] for r in runs for w in r["windows"]}
    flat = [t for ts in totals.values() for t in ts]
    ok = engines == {"graph"} and flat == [1] * len(flat)
    shape = "per window (the same at 32 and 256 steps)" if len(set(flat)) == 1 else "varies with the steps"
    verdict = (
        f"blocking CUDA runtime calls per window {totals} (steps per window: counts), {shape}; "
        f"engines {sorted(engines)} -> {'ONE sync per window' if ok else 'NOT one sync per window'}"
    )
    args.out.write_text(json.dumps({"verdict": verdict, "ok": ok, "runs": runs}, indent=1) + "\n")
    print(verdict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
