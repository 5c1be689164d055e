"""Benchmark SuperBPE against BPE trained on the same text (spec §4, issue #3).

For each vocabulary size V: BPE (t = V) and SuperBPE at t = 0, 0.2V, 0.4V, 0.6V, 0.8V, all
trained on the same corpus (docs-en train split, all of it) with `pertoken superbpe train` in a
fresh process each (so each run's peak RSS is its own). Then bytes per token on held-out
wiki-en, docs-en, handbook-de and linux-doc-zh, tokens relative to BPE, superword entries, and
encode throughput on whole documents (best of 3). Tokenizers: RAYON_NUM_THREADS=1, so training
and encoding run on one thread each.

Writes docs/results/superbpe.json and .md. Trained tokenizers are kept under
$PERTOKEN_CACHE/bench/superbpe; a rerun (or --resume) reuses those already trained.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pertoken.bench import environment, markdown_table, write_results
from pertoken.data import build_corpus, open_corpus, take_bytes
from pertoken.models import cache_dir
from pertoken.superbpe.evaluate import load_any_tokenizer, score_tokenizers


def train(folder: Path, corpus: str, vocab: int, transition: int, max_bytes: int | None,
          stage2_max_bytes: int | None) -> dict:
    if (folder / "training.json").is_file():
        return json.loads((folder / "training.json").read_text())
    cmd = [sys.executable, "-m", "pertoken", "superbpe", "train", "--corpus", corpus,
           "--vocab-size", str(vocab), "--transition", str(transition), "-o", str(folder),
           "--overwrite"]
    if stage2_max_bytes:
        cmd += ["--stage2-max-bytes", str(stage2_max_bytes)]
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    info = json.loads((folder / "training.json").read_text())
    info["wall_seconds"] = time.perf_counter() - start
    (folder / "training.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--corpus", default="docs-en")
    parser.add_argument("--stage2-max-bytes", type=int, default=None)
    parser.add_argument("--eval-corpora", nargs="+",
                        default=["wiki-en", "docs-en", "handbook-de", "linux-doc-zh"])
    parser.add_argument("--eval-bytes", type=int, default=3_000_000,
                        help="held-out bytes per evaluation corpus (at most)")
    parser.add_argument("--results-dir", default="docs/results")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--resume", action="store_true", help="reuse trained tokenizers (default)")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = "1"
    work = Path(args.work_dir) if args.work_dir else cache_dir() / "bench" / "superbpe"
    meta = build_corpus(args.corpus, install=True)
    train_bytes = meta["splits"]["train"]["bytes"]

    runs = []
    for vocab in args.vocab_sizes:
        points = [("BPE", vocab)] + [(f"t={f:g}V", int(round(f * vocab))) for f in args.fractions]
        for label, t in points:
            folder = work / f"V{vocab}-t{t}"
            print(f"== V={vocab} {label} (t={t})", flush=True)
            info = train(folder, args.corpus, vocab, t, None, args.stage2_max_bytes)
            stats = info["stats"]
            runs.append({"vocab_size": vocab, "label": label, "transition": t,
                         "fraction": t / vocab, "folder": str(folder), "stats": stats,
                         "train_seconds": stats["stage1_seconds"] + stats["stage2_encode_seconds"]
                         + stats["stage2_train_seconds"]})

    evaluations = {}
    for name in args.eval_corpora:
        docs = list(take_bytes(open_corpus(name, install=True).documents("heldout"), args.eval_bytes))
        n_bytes = sum(len(d.encode()) for d in docs)
        for vocab in args.vocab_sizes:
            group = [r for r in runs if r["vocab_size"] == vocab]
            scores = score_tokenizers([(r["label"], load_any_tokenizer(r["folder"])) for r in group],
                                      docs)
            for run, score in zip(group, scores):
                run.setdefault("eval", {})[name] = {
                    "bytes_per_token": score.bytes_per_token, "relative_tokens": score.relative_tokens,
                    "encode_mb_per_s": score.encode_mb_per_s}
                run["superword_entries"] = score.superword_entries
        evaluations[name] = {"bytes": n_bytes, "documents": len(docs)}
        print(f"evaluated on {name}: {n_bytes:,} bytes", flush=True)

    rows = []
    for run in runs:
        bpe = next(r for r in runs if r["vocab_size"] == run["vocab_size"] and r["label"] == "BPE")
        stats = run["stats"]
        row = {"V": run["vocab_size"], "tokenizer": run["label"], "t": run["transition"],
               "superwords": run["superword_entries"],
               "train_s": run["train_seconds"], "train_vs_bpe": run["train_seconds"] / bpe["train_seconds"],
               "stage1_s": stats["stage1_seconds"], "stage2_s": stats["stage2_encode_seconds"]
               + stats["stage2_train_seconds"],
               "stage1_rss_mb_per_corpus_mb": stats["stage1_peak_rss_mb"] / (train_bytes / 1e6),
               "stage2_rss_mb_per_corpus_mb": stats["stage2_peak_rss_mb"] / (train_bytes / 1e6)}
        for name in args.eval_corpora:
            row[f"{name}_bpt"] = run["eval"][name]["bytes_per_token"]
            row[f"{name}_rel"] = run["eval"][name]["relative_tokens"]
        row["docs_en_encode_mb_s"] = run["eval"].get("docs-en", {}).get("encode_mb_per_s")
        row["encode_mb_s_vs_bpe"] = (run["eval"]["docs-en"]["encode_mb_per_s"]
                                     / bpe["eval"]["docs-en"]["encode_mb_per_s"]
                                     if "docs-en" in run["eval"] else None)
        rows.append(row)

    english = [n for n in ("wiki-en", "docs-en") if n in args.eval_corpora]
    summary = {}
    for vocab in args.vocab_sizes:
        group = [r for r in rows if r["V"] == vocab and r["tokenizer"] != "BPE"]
        for name in english:
            best = min(group, key=lambda r: r[f"{name}_rel"])
            summary[f"V{vocab}_{name}_best"] = best["tokenizer"]
            summary[f"V{vocab}_{name}_fewer_tokens_pct"] = 100 * (1 - best[f"{name}_rel"])
        summary[f"V{vocab}_max_train_vs_bpe_t>0"] = max(r["train_vs_bpe"] for r in group
                                                         if r["t"] > 0)

    plots = []
    for name in args.eval_corpora:
        series = {}
        for vocab in args.vocab_sizes:
            group = sorted((r for r in rows if r["V"] == vocab), key=lambda r: r["t"])
            series[f"V={vocab}"] = [r[f"{name}_bpt"] for r in group]
        x = [f"{r['t'] / r['V']:.2g}" for r in sorted((r for r in rows if r["V"] == args.vocab_sizes[0]),
                                                      key=lambda r: r["t"])]
        plots.append({"title": f"Bytes per token on held-out {name} (t/V = 1 is BPE)",
                      "x": x, "series": series, "xlabel": "transition t / V",
                      "ylabel": "bytes per token"})
    result = {
        "method": "superbpe",
        "title": "SuperBPE against BPE trained on the same text",
        "description": (f"Trained on {args.corpus} train ({train_bytes / 1e6:.1f} MB); stage 2 on "
                        f"{'all of it' if not args.stage2_max_bytes else f'{args.stage2_max_bytes / 1e6:.0f} MB'}; "
                        "paper pretokenization, 4-word cap, ':Ġ' rule; tokenizers on 1 thread "
                        "(RAYON_NUM_THREADS=1); encode throughput on whole held-out documents, best of 3."),
        "environment": environment(), "train_corpus": args.corpus, "train_bytes": train_bytes,
        "evaluation": evaluations, "summary": summary, "rows": rows, "plots": plots,
    }
    cols = ["V", "tokenizer", "t", "superwords", "train_s", "train_vs_bpe",
            "stage1_rss_mb_per_corpus_mb", "stage2_rss_mb_per_corpus_mb"] + \
        [f"{n}_bpt" for n in args.eval_corpora] + [f"{n}_rel" for n in english] + ["docs_en_encode_mb_s", "encode_mb_s_vs_bpe"]
    md = (f"# {result['title']}\n\n{result['description']}\n\n"
          + markdown_table(rows, cols) + "\n## Summary\n\n"
          + "\n".join(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}"
                      for k, v in summary.items()) + "\n")
    path = write_results(Path(args.results_dir), "superbpe", result, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
