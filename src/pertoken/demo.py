"""``pertoken demo``: every method that exists so far, at a small quick setting, on the default
model and corpora, then the report.

- evaluation: perplexity and bits per byte of the default model on the held-out split of each
  corpus that can be built here (the wiki corpora always can; the Debian documentation corpora
  when their packages are installed);
- SuperBPE: BPE against SuperBPE at a few transition points, trained on wiki-en at a small
  vocabulary, scored on held-out wiki-en beside the default model's own tokenizer.
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
    superbpe_vocab: int = 8192
    """vocabulary size of the demo's SuperBPE and BPE tokenizers"""
    superbpe_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """transition points t / V of the demo's tokenizers (1.0 is plain BPE)"""


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


def run_superbpe(config: DemoConfig) -> Path:
    """BPE against SuperBPE on wiki-en; writes ``demo-superbpe.json``."""
    from tqdm.auto import tqdm

    from pertoken.atomic import write_json_atomic
    from pertoken.data import open_corpus
    from pertoken.superbpe import SuperBPEConfig, load_any_tokenizer, score_tokenizers, train_superbpe

    corpus = open_corpus("wiki-en")
    heldout = list(corpus.documents("heldout"))
    trained = []
    for fraction in tqdm(config.superbpe_fractions, desc="demo: SuperBPE", unit="tokenizer"):
        t = int(round(fraction * config.superbpe_vocab))
        tokenizer, info = train_superbpe(corpus.documents("train"),
                                         SuperBPEConfig(vocab_size=config.superbpe_vocab,
                                                        transition=t),
                                         corpus.documents("train"))
        name = "BPE" if t == config.superbpe_vocab else f"SuperBPE t={fraction:g}V"
        stats = info["stats"]
        trained.append((name, tokenizer, t, stats["stage1_seconds"] + stats["stage2_encode_seconds"]
                        + stats["stage2_train_seconds"]))
    bpe_first = [trained[-1]] + trained[:-1]
    scores = score_tokenizers([(n, tok) for n, tok, _, _ in bpe_first]
                              + [(config.model, load_any_tokenizer(config.model))], heldout)
    rows = []
    for score, (_, _, t, seconds) in zip(scores, bpe_first + [(None, None, None, None)]):
        rows.append({"tokenizer": score.name, "transition": t, "vocab_size": score.vocab_size,
                     "bytes_per_token": score.bytes_per_token,
                     "relative_tokens": score.relative_tokens,
                     "superword_entries": score.superword_entries,
                     "encode_mb_per_s": score.encode_mb_per_s, "train_seconds": seconds})
    curve = sorted(rows[:-1], key=lambda r: r["transition"])
    out = {
        "method": "superbpe", "title": f"Demo: SuperBPE against BPE at V={config.superbpe_vocab}",
        "description": "Trained on wiki-en train (4.6 MB), scored on wiki-en held-out; "
                       "relative tokens are against BPE of the same size.",
        "rows": rows,
        "plots": [{"title": "Bytes per token on held-out wiki-en (t/V = 1 is BPE)",
                   "x": [f"{r['transition'] / config.superbpe_vocab:g}" for r in curve],
                   "series": {f"V={config.superbpe_vocab}": [r["bytes_per_token"] for r in curve]},
                   "xlabel": "transition t / V", "ylabel": "bytes per token"}],
    }
    return write_json_atomic(config.results_dir / "demo-superbpe.json", out)


def run_demo(config: DemoConfig) -> Path:
    """Run the demo and return the report's path."""
    import torch

    from pertoken.models import load_model
    from pertoken.report import build_report

    start = time.perf_counter()
    torch.set_num_threads(config.threads)
    model, tokenizer = load_model(config.model)
    for path in (run_eval(config, model, tokenizer), run_superbpe(config)):
        log.info("wrote %s", path)
    report = build_report(config.results_dir, config.report)
    log.info("demo done in %.0f s; open %s", time.perf_counter() - start, report)
    return report
