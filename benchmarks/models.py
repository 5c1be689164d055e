"""Benchmark the foundation on the default model: loading time and perplexity cost.

Baselines, in the same run:
- loading: transformers reading the GGUF file directly (what a user would otherwise do) against
  pertoken's cached safetensors conversion; each load in a fresh process;
- perplexity: float32 against bfloat16, sdpa, on held-out wiki-en.

Writes docs/results/models.json and docs/results/models.md. Threads: 1 (see --threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from pertoken.bench import environment, markdown_table, pin_threads, write_results
from pertoken.data import open_corpus
from pertoken.evaluate import PerplexityConfig, perplexity
from pertoken.models import ALIASES, DEFAULT_MODEL, alias_gguf, load_model

LOAD_SNIPPET = """
import json, sys, time, torch
torch.set_num_threads({threads})
from pertoken.models import load_model
w0, c0 = time.perf_counter(), time.process_time()
model, tok = load_model({target!r})
print(json.dumps({{"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}}))
"""


def time_load(target: str, threads: int) -> dict:
    code = LOAD_SNIPPET.format(target=target, threads=threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--results-dir", default="docs/results")
    args = parser.parse_args()
    pin_threads(args.threads)

    load_model(DEFAULT_MODEL)  # make sure the conversion is cached before timing
    gguf = str(alias_gguf(DEFAULT_MODEL))
    loads = []
    for label, target in [("transformers from GGUF", gguf), ("pertoken cached alias", DEFAULT_MODEL)]:
        runs = [time_load(target, args.threads) for _ in range(args.repeats)]
        loads.append({"loader": label, "median_wall_s": statistics.median(r["wall_s"] for r in runs),
                      "median_cpu_s": statistics.median(r["cpu_s"] for r in runs),
                      "runs_wall_s": [r["wall_s"] for r in runs]})
    speedup = loads[0]["median_wall_s"] / loads[1]["median_wall_s"]

    corpus = open_corpus("wiki-en")
    ppl_rows = []
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model(DEFAULT_MODEL, dtype=dtype)
        runs = [perplexity(model, tok, corpus.documents("heldout"),
                           PerplexityConfig(max_tokens=args.max_tokens), progress=False)
                for _ in range(args.repeats)]
        ppl_rows.append({"dtype": dtype, "attn": "sdpa", "tokens": runs[0].tokens,
                         "perplexity": runs[0].perplexity, "bits_per_byte": runs[0].bits_per_byte,
                         "median_wall_s": statistics.median(r.seconds for r in runs),
                         "tokens_per_s": runs[0].tokens / statistics.median(r.seconds for r in runs)})
        del model

    result = {
        "method": "models", "title": f"Loading and evaluating {DEFAULT_MODEL}",
        "description": f"{ALIASES[DEFAULT_MODEL].description}. Medians of {args.repeats} runs, "
                       f"{args.threads} torch thread(s); each load in a fresh process.",
        "environment": environment(), "load_speedup": speedup, "loads": loads,
        "perplexity_wiki_en_heldout": ppl_rows,
        "plots": [{"title": "Load time of the default model (median, s)", "kind": "bar",
                   "x": [r["loader"] for r in loads],
                   "series": {"wall seconds": [r["median_wall_s"] for r in loads]}}],
    }
    md = (f"# {result['title']}\n\n{result['description']}\n\n## Load time\n\n"
          + markdown_table(loads, ["loader", "median_wall_s", "median_cpu_s"])
          + f"\nCached load is {speedup:.1f}x faster.\n\n## Perplexity, wiki-en held-out\n\n"
          + markdown_table(ppl_rows, ["dtype", "attn", "tokens", "perplexity", "bits_per_byte",
                                      "median_wall_s", "tokens_per_s"]))
    path = write_results(Path(args.results_dir), "models", result, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
