"""Shared helpers of the benchmark scripts: side-by-side timing, statistics, machine facts, output.

Every benchmark measures its contestants in one process, interleaved over repeats (the order is
rotated each repeat so neither side always runs first / on a warmer cache), after warmup runs
that are not recorded. Ratios are computed per repeat (paired) and then summarised, so a slow
moment of the machine hits both contestants of that repeat.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """min, median, interquartile range (q1, q3) and max of a sample."""
    v = sorted(values)
    if len(v) == 1:
        q1 = q3 = v[0]
    else:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return {"min": v[0], "median": statistics.median(v), "q1": q1, "q3": q3, "max": v[-1], "n": len(v)}


def interleaved(contestants: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                sync: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall-clock seconds of each contestant per repeat, run side by side.

    Returns (times[name] -> list of seconds, last_result[name] -> what the callable returned last).
    """
    names = list(contestants)
    times: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, Any] = {}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if sync:
                sync()
            t0 = time.perf_counter()
            last[name] = contestants[name]()
            if sync:
                sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times, last


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """Per-repeat ratio num[i] / den[i], summarised."""
    return quantiles([a / b for a, b in zip(num, den)])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    except OSError:
        pass
    return []


def machine_facts() -> dict[str, Any]:
    facts = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "loadavg_at_start": loadavg(),
    }
    try:
        import transformers as tf
        facts["transformers"] = tf.__version__
    except ImportError:
        pass
    return facts


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_line(facts: dict[str, Any]) -> str:
    return (f"CPU: {facts['cpu']} ({facts['logical_cpus']} logical CPUs; {' '.join(facts['cpu_flags'])}), "
            f"torch {facts['torch']} ({facts['torch_threads']} intra-op threads), "
            f"transformers {facts.get('transformers', '-')}, python {facts['python']}, "
            f"CUDA available: {facts['cuda_available']}; load average at start {facts['loadavg_at_start']}, "
            f"at end {loadavg()}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def fmt_s(q: dict[str, float], scale: float = 1000.0, unit: str = "ms", digits: int = 1) -> str:
    """'median [q1, q3] unit' of a quantiles dict (seconds scaled to `unit`)."""
    return f"{q['median'] * scale:.{digits}f} [{q['q1'] * scale:.{digits}f}, {q['q3'] * scale:.{digits}f}] {unit}"


def fmt_x(q: dict[str, float], digits: int = 2) -> str:
    return f"{q['median']:.{digits}f}× [{q['q1']:.{digits}f}, {q['q3']:.{digits}f}]"


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")


def add_run_args(p: Any, repeats: int = 3) -> None:
    """The options every benchmark shares: repeats, warmup, torch threads, seed, JSON output."""
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs per contestant (interleaved)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per contestant first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads stall at "
                        "every op barrier; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
