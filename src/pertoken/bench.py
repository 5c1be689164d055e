"""Helpers for benchmarks: a fixed thread count, wall and CPU time, medians, and results files.

On a busy 2-core machine torch threads spin-wait and fight, so benchmarks pin the thread count
(1 by default) and report CPU time beside wall time, with the thread count, dtype and attention
implementation recorded next to every number.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pertoken.atomic import write_json_atomic, write_text_atomic


def pin_threads(threads: int = 1) -> int:
    """Set torch's intra-op thread count and return it."""
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup + repeats`` times; median and all runs of wall and CPU seconds."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"median_wall_s": statistics.median(wall), "median_cpu_s": statistics.median(cpu),
            "wall_s": wall, "cpu_s": cpu, "repeats": repeats}


def environment() -> dict:
    """What the numbers were measured on."""
    import torch
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else (None,)
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1min": load[0], "python": platform.python_version()}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` (floats to 4 significant digits)."""
    def fmt(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(results_dir: Path, name: str, result: dict, markdown: str) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` into ``results_dir`` atomically."""
    write_text_atomic(Path(results_dir) / f"{name}.md", markdown)
    return write_json_atomic(Path(results_dir) / f"{name}.json", result)


class PeakMemory:
    """Peak resident memory of this process while the ``with`` block runs, sampled every 20 ms.

    ``peak_mb`` is the highest RSS seen (at least the RSS at entry and exit).
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> "PeakMemory":
        import threading

        self.peak_mb = self.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())
