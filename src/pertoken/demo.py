"""``pertoken demo``: every method that exists so far, at a small quick setting, on the default
model and corpora, then the report.

So far that is the shared evaluation: perplexity and bits per byte of the default model on the
held-out split of each corpus that can be built here (the wiki corpora always can; the Debian
documentation corpora when their packages are installed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from pertoken.errors import UserError

log = logging.getLogger(__name__)

DEMO_CORPORA = ("wiki-en", "wiki-fr", "wiki-es", "linux-doc-en", "linux-doc-zh", "python-doc-en",
                "rust-doc-en", "handbook-en", "handbook-de", "handbook-zh")


@dataclass
class DemoConfig:
    """What the demo runs."""

    results_dir: Path = Path("docs/results")
    """where the demo-*.json files go"""
    report: Path = Path("report/index.html")
    """where the HTML report goes"""
    model: str = "smollm2-135m-instruct"
    """the model every method runs on"""
    max_tokens: int = 4096
    """tokens scored per corpus"""
    threads: int = 1
    """torch threads (1 is fastest and steadiest on a busy 2-core machine)"""
    corpora: tuple[str, ...] = field(default=DEMO_CORPORA)
    """corpora to evaluate on; those that cannot be built here are skipped"""


def run_eval(config: DemoConfig, model, tokenizer) -> Path:
    """Perplexity on each available corpus; writes ``demo-eval.json``."""
    import torch
    from tqdm.auto import tqdm

    from pertoken.atomic import write_json_atomic
    from pertoken.data import open_corpus
    from pertoken.evaluate import PerplexityConfig, perplexity

    rows, skipped = [], []
    for name in tqdm(config.corpora, desc="demo: perplexity", unit="corpus"):
        try:
            corpus = open_corpus(name)
        except UserError as why:
            log.info("skipping %s: %s", name, why)
            skipped.append({"corpus": name, "reason": str(why)})
            continue
        result = perplexity(model, tokenizer, corpus.documents("heldout"),
                            PerplexityConfig(max_tokens=config.max_tokens), progress=False)
        rows.append({"corpus": name, "split": "heldout", "tokens": result.tokens,
                     "bytes": result.bytes, "bytes_per_token": result.bytes / result.tokens,
                     "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte,
                     "seconds": result.seconds})
    out = {
        "method": "eval",
        "title": f"Perplexity of {config.model} on held-out text",
        "description": "Strided sliding window (512 tokens, stride 256), eos before each "
                       "document, float32, sdpa. The default model carries Q4_1 rounding.",
        "model": config.model, "threads": torch.get_num_threads(), "dtype": "float32",
        "max_tokens_per_corpus": config.max_tokens, "rows": rows, "skipped": skipped,
        "plots": [{"title": "Bits per byte on held-out text", "kind": "bar",
                   "x": [r["corpus"] for r in rows],
                   "series": {config.model: [r["bits_per_byte"] for r in rows]},
                   "ylabel": "bits per byte"}],
    }
    return write_json_atomic(config.results_dir / "demo-eval.json", out)


def run_demo(config: DemoConfig) -> Path:
    """Run the demo and return the report's path."""
    import torch

    from pertoken.models import load_model
    from pertoken.report import build_report

    start = time.perf_counter()
    torch.set_num_threads(config.threads)
    model, tokenizer = load_model(config.model)
    path = run_eval(config, model, tokenizer)
    log.info("wrote %s", path)
    report = build_report(config.results_dir, config.report)
    log.info("demo done in %.0f s; open %s", time.perf_counter() - start, report)
    return report
