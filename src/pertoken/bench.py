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


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
"""the instruction sets that decide which kernels run fast (bf16 arithmetic is emulated
without ``avx512_bf16`` or AMX, which makes bf16 GEMMs of a few rows several times slower)"""


def cpu_model() -> tuple[str | None, list[str]]:
    """The CPU's model name and which of :data:`CPU_FLAGS` it has (from ``/proc/cpuinfo``;
    ``(None, [])`` where that is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name"), [f for f in CPU_FLAGS if f in flags]


def environment() -> dict:
    """What the numbers were measured on."""
    import torch
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else (None,)
    model, flags = cpu_model()
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "cpu_model": model, "cpu_flags": flags,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
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
