"""Latency measurement shared by the benchmarks (``tools/bench.py``, ``tools/bench_fuse.py``).

A 2-core VM drifts by tens of percent between seconds, so forms are never timed one after
the other. Each *repeat* times every form back to back (``calls`` calls each), in an order
rotated by one per repeat; a form's latency is the median over repeats, and a ratio
between two forms is the median of the per-repeat ratios, which cancels drift that is
slow compared with one repeat.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def interleaved(runners: dict[str, Callable[[], object]], repeats: int, calls: int,
                warmup: int = 3, tick: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each runner: ``repeats`` samples each, interleaved as above.
    ``tick`` (e.g. a progress bar's update) is called after every repeat."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    keys = list(runners)
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for repeat in range(repeats):
        shift = repeat % len(keys)
        for key in keys[shift:] + keys[:shift]:
            run = runners[key]
            start = time.perf_counter()
            for _ in range(calls):
                run()
            samples[key].append((time.perf_counter() - start) / calls)
        if tick is not None:
            tick()
    return samples


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of per-repeat ratios ``numerator[i] / denominator[i]``."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def machine_description() -> str:
    """CPU model and core count, e.g. ``Intel(R) Xeon(R) Processor, 2 cores``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"
