"""Benchmark the fp32 GEMMs of packed linears on the default model: MKL's packed GEMM against
oneDNN's linear on a reordered weight (``pertoken.models.PackedLinear``), in one process on one
model object, for passes of a few tokens over a 256-token cache (what a speculative tree pass
is), and the kernel ``fp32_small_batch_kernel`` picks on this CPU.

Each repeat times every pass size under each kernel in turn (interleaved); medians of the
repeats. Writes docs/results/fp32-gemm.json and .md. Threads: 2 (see --threads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from pertoken.bench import environment, markdown_table, pin_threads, write_results
from pertoken.models import (DEFAULT_MODEL, fp32_small_batch_kernel, load_model,
                             mkl_packing_available, onednn_fp32_available, small_batch_layout)


@torch.inference_mode()
def pass_seconds(model, sizes, repeats: int, context: int = 256) -> dict:
    """``{kernel: {tokens: [seconds per repeat]}}`` for each available kernel."""
    from transformers import DynamicCache

    kernels = [k for k, ok in (("mkl", mkl_packing_available()),
                               ("onednn", onednn_fp32_available())) if ok]
    ids = torch.randint(100, 40000, (1, context + max(sizes)),
                        generator=torch.Generator().manual_seed(0))
    out = {k: {n: [] for n in sizes} for k in kernels}
    for repeat in range(repeats + 1):  # the first round warms up (packs the weights)
        for kernel in kernels:
            os.environ["PERTOKEN_FP32_GEMM"] = kernel
            small_batch_layout(model)  # repacks for the kernel
            for n in sizes:
                cache = DynamicCache(config=model.config)
                model(input_ids=ids[:, :context], cache=cache)
                start = time.perf_counter()
                model(input_ids=ids[:, context:context + n], cache=cache)
                if repeat:
                    out[kernel][n].append(time.perf_counter() - start)
    os.environ.pop("PERTOKEN_FP32_GEMM")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sizes", default="1,4,8,12,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", default="docs/results")
    args = parser.parse_args()
    threads = pin_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    model, _ = load_model(args.model, dtype="float32")
    os.environ.pop("PERTOKEN_FP32_GEMM", None)
    chosen = fp32_small_batch_kernel()
    times = pass_seconds(model, sizes, args.repeats)
    rows = []
    for kernel, by_size in times.items():
        one = statistics.median(by_size[sizes[0]])
        for n, runs in by_size.items():
            rows.append({"kernel": kernel, "tokens": n, "ms": 1e3 * statistics.median(runs),
                         "vs_first_size": statistics.median(runs) / one,
                         "runs_ms": [round(1e3 * r, 2) for r in runs]})
    result = {"method": "fp32-gemm", "model": args.model, "threads": threads,
              "repeats": args.repeats, "context": 256, "chosen": chosen,
              "environment": environment(), "results": rows}
    env = result["environment"]
    md = (f"# fp32 packed GEMMs: MKL against oneDNN\n\n{args.model}, float32, {threads} threads, "
          f"a pass over N tokens after a 256-token cache, medians of {args.repeats} interleaved "
          f"repeats. CPU: {env.get('cpu_model')} ({', '.join(env['cpu_flags'])}); load "
          f"average at the end {env['load_average_1min']}. `fp32_small_batch_kernel` chose "
          f"**{chosen}**. The one-token pass takes the plain kernel under both.\n\n"
          + markdown_table(rows, ["kernel", "tokens", "ms", "vs_first_size"]))
    print(md)
    write_results(Path(args.results_dir), "fp32-gemm", result, md)


if __name__ == "__main__":
    main()
