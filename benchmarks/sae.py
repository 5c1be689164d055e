"""Benchmark adaptive-sparsity SAEs on SmolLM2-135M-Instruct's residual stream (issue #5).

Activations: layer 19 of 30 (about two thirds deep), context 256, position 0 dropped and the
rare massive-activation tokens too (``--outlier-ratio``, default 3: norm over 3x the batch
median; about 1 in 5,000, attention sinks at ~100x that held three quarters of the variance, and
a few in 100,000 at 1.5-10x that a Mutual Choice SAE overshoots: two such held-out tokens added
0.026 to its FVU; stores and runs at the earlier ratio 10 keep their unsuffixed names), docs-en:
``--train-tokens`` (default 2M) from the train split and ``--heldout-tokens`` (200k) from the
held-out split, cached once with ``pertoken sae cache``; the model runs in ``--dtype``
(default float32; the store is float16 either way) for caching and for the CE loss. Which
dtype is faster depends on the CPU: one 2-core VM cached 3x faster in bfloat16, another (with
AMX) at 1.35k tokens/s in float32 against 0.7k in bfloat16.

Runs (width 4608, batch 4608 tokens, each k of ``--ks``): TopK + aux_k, Mutual Choice + aux_k
(= BatchTopK), Mutual Choice + aux_zipf, Feature Choice with uniform and with Zipf capacities,
each trained by ``pertoken sae train`` in its own process; and SAELens's own TopK and BatchTopK
trainers (``SAETrainer``) on the same activations, scaled the same way, with the same width, k,
batch, tokens and schedule (``--saelens-ks``, default 16, 32 and 64). Every run uses
``--threads`` torch threads (default 2). Each trainer runs at its own best Adam rate on the grid
3.8e-4 (the spec's 2e-4 / sqrt(width / 2^14), ``--lr 0``), 1.5e-3, 3e-3, 6e-3, 1.2e-2: ours at
``--lr`` 6e-3, SAELens's at ``--saelens-lr`` 1.5e-3 (TopK, k = 64, held-out FVU: ours 0.174,
0.154, 0.143, 0.148 from 1.5e-3 up; SAELens 0.162 at 1.5e-3, 0.203 at 3e-3, diverged at 6e-3;
at 3.8e-4, k = 32, both far worse). One shared rate favours whichever trainer it suits: SAELens
starts its decoder columns at norm 0.1 and divides by their norms, so the same step turns its
directions several times further than our unit-norm columns'. ``--passes`` trains on the store
several times; another pass count or rate puts its runs and results in their own folders and
files (``sae-x5.json`` for five passes, ``sae-speclr.json`` at the spec's rate).

Evaluation on the held-out store: FVU, realised L0 (and its per-token distribution) and dead
fraction, in batch mode (B = 4608) and threshold mode (token by token); CE loss recovered and KL
with the SAE spliced into the model for the k = 32 runs. Writes docs/results/sae.json and .md
with plots of FVU against realised L0 and feature-density histograms. Trained SAEs stay under
$PERTOKEN_CACHE/bench/sae; a rerun reuses finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from pertoken.bench import environment, markdown_table, write_results
from pertoken.models import DEFAULT_MODEL, cache_dir
from pertoken.sae.cache import OUTLIER_RATIO

LAYER = 19
VARIANTS = {
    "topk+auxk": ["--arch", "topk", "--aux", "auxk"],
    "mc+auxk": ["--arch", "mutual-choice", "--aux", "auxk"],
    "mc+zipf": ["--arch", "mutual-choice", "--aux", "zipf"],
    "fc-uniform": ["--arch", "feature-choice", "--aux", "auxk"],
    "fc-zipf": ["--arch", "feature-choice", "--aux", "auxk", "--capacities", "zipf"],
}
SAELENS = {"saelens-topk": "topk", "saelens-batchtopk": "batchtopk"}


def _run(cmd: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def cache(args, work: Path) -> tuple[Path, Path]:
    stores = {}
    for split, tokens in (("train", args.train_tokens), ("heldout", args.heldout_tokens)):
        out = work / f"acts-{split}-{tokens}{_data_suffix(args)}"
        meta = out / "meta.json"
        if not (meta.is_file() and json.loads(meta.read_text()).get("complete")):
            cmd = [sys.executable, "-m", "pertoken", "sae", "cache", "--model", args.model,
                   "--layer", str(LAYER), "--corpus", "docs-en", "--split", split,
                   "--tokens", str(tokens), "--threads", str(args.threads),
                   "--dtype", args.dtype, "--outlier-ratio", f"{args.outlier_ratio:g}",
                   "-o", str(out)]
            if meta.is_file():
                cmd.append("--resume")
            _run(cmd, args.threads)
        stores[split] = out
    return stores["train"], stores["heldout"]


DEFAULT_LR = 6e-3
DEFAULT_SAELENS_LR = 1.5e-3


def _data_suffix(args) -> str:
    """Store and runs folders at an outlier ratio other than 10 (the first one) name it."""
    return "" if args.outlier_ratio == 10 else f"-outliers{args.outlier_ratio:g}"


def _lr_suffix(lr: float) -> str:
    return f"-lr{lr:g}" if lr else ""


def _runs_dir(args, lr: float) -> str:
    """The runs folder of the runs trained at ``lr`` (ours at ``--lr``, SAELens's at
    ``--saelens-lr``)."""
    return (f"runs-{args.train_tokens}" + (f"x{args.passes}" if args.passes > 1 else "")
            + _lr_suffix(lr) + _data_suffix(args))


def train_ours(args, acts: Path, folder: Path, extra: list[str], k: int) -> None:
    if (folder / "training.json").is_file():
        return
    cmd = [sys.executable, "-m", "pertoken", "sae", "train", "--acts", str(acts),
           "--width", str(args.width), "--k", str(k),
           "--tokens", str(args.train_tokens * args.passes),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--lr", str(args.lr), "-o", str(folder), *extra]
    if (folder / ".train" / "checkpoint.pt").is_file():
        cmd.append("--resume")
    _run(cmd, args.threads)


def train_saelens(args, acts: Path, folder: Path, arch: str, k: int) -> None:
    """SAELens's trainer in a fresh process (this script with ``--saelens-run``)."""
    if (folder / "training.json").is_file():
        return
    _run([sys.executable, __file__, "--saelens-run", arch, "--k", str(k), "--acts", str(acts),
          "--width", str(args.width), "--batch-size", str(args.batch_size),
          "--train-tokens", str(args.train_tokens), "--passes", str(args.passes),
          "--threads", str(args.threads), "--lr", str(args.saelens_lr),
          "--out", str(folder)], args.threads)


def saelens_run(args) -> None:
    """Train one SAE with SAELens's ``SAETrainer`` on our store (scaled by the store's scale,
    as ours are), convert it to our class and save it in raw units with ``save_sae``. The
    trained SAE and the fit's timing are kept in ``<out>.saelens`` first, so a failed
    conversion reruns without training again."""
    import numpy as np
    import torch
    from sae_lens import (SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig,
                          TopKTrainingSAE, TopKTrainingSAEConfig)
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from pertoken.atomic import write_json_atomic
    from pertoken.sae.cache import ActivationStore
    from pertoken.sae.io import save_sae
    from pertoken.sae.model import SAEConfig, SparseAutoencoder
    from pertoken.sae.train import TrainConfig

    torch.set_num_threads(args.threads)
    store = ActivationStore(args.acts)
    ours = TrainConfig(tokens=args.train_tokens * args.passes, batch_size=args.batch_size,
                       lr=args.lr)
    steps = ours.steps
    batch = args.batch_size

    def batches():
        step = 0
        while True:
            rows = np.arange(step * batch, (step + 1) * batch) % len(store)
            yield store.rows(rows) * store.scale
            step += 1

    common = dict(d_in=store.d_in, d_sae=args.width, k=args.k, dtype="float32", device="cpu")
    if args.saelens_run == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch,
        lr=ours.effective_lr(args.width), lr_warm_up_steps=ours.warmup_steps,
        lr_decay_steps=int(steps * ours.decay_fraction), lr_end=0.0,
        dead_feature_window=max(1, ours.effective_dead_tokens() // batch),
        logger=LoggingConfig(log_to_wandb=False))
    folder = Path(args.out)
    tmp = folder.with_name(folder.name + ".saelens")
    fit = tmp / "fit.json"
    if not fit.is_file():
        trainer = SAETrainer(trainer_cfg, sae, batches())
        began = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - began
        trainer.sae.save_inference_model(str(tmp))
        write_json_atomic(fit, {"seconds": seconds, "steps": steps, "lr": trainer_cfg.lr})
    seconds = json.loads(fit.read_text())["seconds"]
    inference = SAE.load_from_disk(str(tmp))
    if getattr(inference.cfg, "rescale_acts_by_decoder_norm", False):
        inference.fold_W_dec_norm()
    arch = "topk" if args.saelens_run == "topk" else "batchtopk"
    mine = SparseAutoencoder(SAEConfig(d_in=store.d_in, width=args.width, k=args.k, arch=arch,
                                       aux="none"))
    with torch.no_grad():
        mine.W_enc.copy_(inference.W_enc.t())
        mine.W_dec.copy_(inference.W_dec.t())
        mine.b_enc.copy_(inference.b_enc)
        mine.b_pre.copy_(inference.b_dec)
        if arch == "batchtopk":
            mine.threshold.copy_(inference.threshold)
    # the conversion must not change the SAE: compare reconstructions on training rows. A
    # wrong conversion changes every row, while float rounding may flip a near-tie in one row's
    # selection (a run once failed a max |diff| check with 0.16, though its saved SAE converted
    # exactly in a fresh process), so the check is the whole sample's squared difference
    # against its centred variance
    sample = store.rows(np.arange(min(len(store), 2048))) * store.scale
    with torch.no_grad():
        theirs = inference.decode(inference.encode(sample))
        diff = mine.decode(mine.encode(sample)) - theirs
        gap = float(diff.abs().max())
        rel = float(diff.pow(2).sum() / (sample - sample.mean(0)).pow(2).sum())
        rows_off = int((diff.abs().amax(1) > 1e-3 * float(theirs.abs().max())).sum())
    if rel > 1e-5:
        raise SystemExit(f"converting the SAELens SAE changed its output: squared difference "
                         f"{rel:.2e} of the variance, {rows_off} rows off")
    save_sae(mine, folder, scale=store.scale,
             metadata={"model_name": store.meta["settings"].get("model"),
                       "hook_name": f"model.layers.{store.meta['layer']}", "trainer": "sae-lens"})
    write_json_atomic(folder / "training.json", {
        "trainer": "sae-lens", "arch": args.saelens_run, "steps": steps,
        "tokens": steps * batch, "batch_size": batch, "threads": args.threads,
        "seconds": seconds, "tokens_per_second": steps * batch / seconds,
        "lr": trainer_cfg.lr, "dead_feature_window_steps": trainer_cfg.dead_feature_window,
        "conversion_max_abs_diff": gap, "conversion_relative_sq_diff": rel,
        "conversion_rows_off": rows_off,
        "saelens_defaults_kept": {"decoder_init_norm": sae.cfg.decoder_init_norm,
                                  "rescale_acts_by_decoder_norm":
                                      sae.cfg.rescale_acts_by_decoder_norm,
                                  "aux_loss_coefficient": sae.cfg.aux_loss_coefficient}})


def evaluate_run(args, folder: Path, heldout: Path, with_ce: bool) -> dict:
    cached = folder / "eval.json"
    if cached.is_file():
        result = json.loads(cached.read_text())
        if result.get("ce") is not None or not with_ce:
            return result
    from pertoken.atomic import write_json_atomic
    from pertoken.sae.cache import ActivationStore
    from pertoken.sae.metrics import ce_loss_recovered, evaluate
    from pertoken.sae.io import load, read_config, training_batch

    sae = load(folder)
    store = ActivationStore(heldout)
    modes = ["batch", "threshold"] if sae.cfg.batch_dependent else ["batch"]
    _, caps = training_batch(read_config(folder))  # Zipf Feature Choice: its capacities
    result = {"modes": {m: evaluate(sae, store, batch_size=args.batch_size, mode=m,
                                    capacities=caps) for m in modes}, "ce": None}
    if with_ce:
        from pertoken.data import open_corpus
        from pertoken.models import load_model

        model, tokenizer = load_model(args.model, dtype=args.dtype)
        docs = open_corpus("docs-en").documents("heldout")
        # the splice leaves alone the tokens the store's cache dropped
        ratio = store.meta["settings"].get("outlier_ratio", 0.0)
        result["ce"] = ce_loss_recovered(sae, model, tokenizer, docs, LAYER, args.ce_sequences,
                                         context=256, outlier_ratio=ratio)
    write_json_atomic(cached, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--train-tokens", type=int, default=2_000_000)
    parser.add_argument("--passes", type=int, default=1,
                        help="passes over the training store (each run trains on passes x "
                             "train-tokens tokens; results go to sae-x{passes} when > 1)")
    parser.add_argument("--heldout-tokens", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=4608)
    parser.add_argument("--batch-size", type=int, default=4608)
    parser.add_argument("--ks", default="16,32,64")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--saelens-ks", default="16,32,64")
    parser.add_argument("--ce-k", type=int, default=32, help="k of the runs scored for CE loss")
    parser.add_argument("--ce-sequences", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help="Adam learning rate of our runs (0: the spec's "
                             "2e-4 / sqrt(width / 2^14), 3.8e-4 at width 4608); runs and "
                             "results of another rate go to their own folders and files")
    parser.add_argument("--saelens-lr", type=float, default=DEFAULT_SAELENS_LR,
                        help="Adam learning rate of SAELens's runs (0: the spec's, as --lr)")
    parser.add_argument("--outlier-ratio", type=float, default=OUTLIER_RATIO,
                        help="the cache drops tokens whose norm exceeds this many times the "
                             "batch median; stores, runs and results of another ratio get their "
                             "own names")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the model's dtype for caching activations and for CE loss")
    parser.add_argument("--results-dir", default="docs/results")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows (and density histograms) of the results file's "
                             "runs that this invocation does not run, e.g. add --ks 16,64 to "
                             "an earlier k = 32 report")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--stage", choices=["cache", "train", "all"], default="all")
    # internal: one SAELens run in this process
    parser.add_argument("--saelens-run", choices=["topk", "batchtopk"], default=None)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--acts", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.saelens_run:
        saelens_run(args)
        return
    work = Path(args.work_dir) if args.work_dir else cache_dir() / "bench" / "sae"
    acts, heldout = cache(args, work)
    if args.stage == "cache":
        return
    ks = [int(k) for k in args.ks.split(",") if k]
    saelens_ks = [int(k) for k in args.saelens_ks.split(",") if k]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown --variants {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    runs = []
    # the k of the acceptance checks first (ours, then SAELens's), then the rest of the sweep
    for k in sorted(set(ks) | set(saelens_ks), key=lambda k: (k != args.ce_k, k)):
        names = (variants if k in ks else []) + (
            list(SAELENS) if k in saelens_ks else [])
        runs += [(name, k, work / _runs_dir(args, args.lr if name in VARIANTS else
                                             args.saelens_lr) / f"{name}-k{k}")
                 for name in names]
    for name, k, folder in runs:
        print(f"== {name} k={k}", flush=True)
        if name in VARIANTS:
            train_ours(args, acts, folder, VARIANTS[name], k)
        else:
            train_saelens(args, acts, folder, SAELENS[name], k)
    if args.stage == "train":
        return
    report(args, runs, acts, heldout)


def _results_name(args) -> str:
    rate = "" if args.lr == DEFAULT_LR else _lr_suffix(args.lr) or "-speclr"
    if args.saelens_lr not in (DEFAULT_SAELENS_LR, args.lr):  # one shared rate: no second part
        rate += f"-saelens{_lr_suffix(args.saelens_lr) or '-speclr'}"
    data = "" if args.outlier_ratio == OUTLIER_RATIO else f"-outliers{args.outlier_ratio:g}"
    return "sae" + (f"-x{args.passes}" if args.passes > 1 else "") + rate + data


def report(args, runs, acts: Path, heldout: Path) -> None:
    from pertoken.sae.train import TrainConfig

    previous = Path(args.results_dir) / f"{_results_name(args)}.json"
    old = json.loads(previous.read_text()) if args.merge and previous.is_file() else {}
    ran = {(name, k) for name, k, _ in runs}
    rows = [r for r in old.get("results", []) if (r["run"], r["k"]) not in ran]
    kept = len(rows)
    densities = {}
    for name, k, folder in runs:
        training = json.loads((folder / "training.json").read_text())
        result = evaluate_run(args, folder, heldout, with_ce=k == args.ce_k)
        for mode, m in result["modes"].items():
            row = {"run": name, "k": k, "mode": mode, "fvu": m["fvu"], "l0": m["l0"],
                   "dead_fraction": m["dead_fraction"], "eval_tokens": m["eval_tokens"],
                   "tokens_per_second": training["tokens_per_second"],
                   "train_seconds": training["seconds"], "threads": training.get("threads"),
                   "peak_rss_mb": training.get("peak_rss_mb")}
            if result["ce"]:
                row.update(ce_loss_recovered=result["ce"]["ce_loss_recovered"],
                           kl_score=result["ce"].get("kl_score"),
                           delta_ce=result["ce"].get("delta_ce"))
            rows.append(row)
        if k == args.ce_k:
            main_mode = "threshold" if "threshold" in result["modes"] else "batch"
            densities[name] = result["modes"][main_mode].get("feature_density")
    rows.sort(key=lambda r: (r["k"] != args.ce_k, r["k"]))  # stable: run order within each k
    acceptance = _acceptance(rows, args.ce_k)
    zipf = (_zipf_quality(densities.get("topk+auxk"))
            or (old.get("zipf_fit_topk_k32") if ("topk+auxk", args.ce_k) not in ran else None))
    old_hist = next((plot["series"] for plot in old.get("plots", []) if plot.get("kind") == "bar"),
                    {})
    plots = _plots(rows, densities, {name: counts for name, counts in old_hist.items()
                                     if (name, args.ce_k) not in ran})
    rates = {name: rate or TrainConfig().effective_lr(args.width)
             for name, rate in (("ours", args.lr), ("SAELens", args.saelens_lr))}
    result = {"method": "sae", "title": "Adaptive-sparsity SAEs against TopK and SAELens",
              "model": args.model, "layer": LAYER, "train_tokens": args.train_tokens,
              "passes": args.passes, "lr": rates["ours"], "saelens_lr": rates["SAELens"],
              "outlier_ratio": args.outlier_ratio,
              "heldout_tokens": args.heldout_tokens, "width": args.width,
              "batch_size": args.batch_size,
              "threads": sorted({r["threads"] for r in rows if r["threads"]}),
              "environment": environment(), "acceptance": acceptance,
              "zipf_fit_topk_k32": zipf, "results": rows,
              "plots": plots}
    if kept:
        result["merged"] = {"rows_kept": kept, "their_environment": old.get("environment")}
    columns = ["run", "k", "mode", "fvu", "l0", "dead_fraction", "ce_loss_recovered",
               "kl_score", "tokens_per_second", "threads", "train_seconds", "peak_rss_mb"]
    passes = f" ({args.passes} passes)" if args.passes > 1 else ""
    passes += ", Adam lr " + " / ".join(f"{v:.2g} ({k})" for k, v in rates.items())
    markdown = (f"# Sparse autoencoders: {args.model}, layer {LAYER}\n\n"
                f"{args.train_tokens:,} training tokens of docs-en{passes}, "
                f"{args.heldout_tokens:,} held-out (tokens over {args.outlier_ratio:g}x the "
                f"batch's median norm dropped); width {args.width}, batch {args.batch_size}; "
                "torch threads per training run in the table.\n\n## Acceptance\n\n"
                + "\n".join(f"- {k}: {v}" for k, v in acceptance.items())
                + (f"\n\nZipf fit of the TopK SAE's held-out feature densities (spec test 4): "
                   f"{zipf}" if zipf else "")
                + "\n\n## All runs\n\n" + markdown_table(rows, columns))
    path = write_results(Path(args.results_dir), _results_name(args), result, markdown)
    print(markdown)
    print(f"wrote {path}")


def _find(rows, run, k, mode):
    return next((r for r in rows if r["run"] == run and r["k"] == k and r["mode"] == mode), None)


def _acceptance(rows, k) -> dict:
    out = {}
    topk = _find(rows, "topk+auxk", k, "batch")
    mc_b, mc_t = _find(rows, "mc+auxk", k, "batch"), _find(rows, "mc+auxk", k, "threshold")
    if topk and mc_b and mc_t:
        out["mc_vs_topk_batch_fvu_ratio"] = mc_b["fvu"] / topk["fvu"]
        out["mc_vs_topk_threshold_fvu_ratio"] = mc_t["fvu"] / topk["fvu"]
        out["l0 (topk, mc batch, mc threshold)"] = [topk["l0"], mc_b["l0"], mc_t["l0"]]
    zipf = _find(rows, "mc+zipf", k, "threshold")
    if zipf:
        out["mc+zipf_threshold_dead_fraction"] = zipf["dead_fraction"]
    for ours, theirs in (("topk+auxk", "saelens-topk"), ("mc+auxk", "saelens-batchtopk")):
        a, b = _find(rows, ours, k, "batch"), _find(rows, theirs, k, "batch")
        if a and b:
            out[f"{ours}_vs_{theirs}_tokens_per_second_ratio"] = (a["tokens_per_second"]
                                                                  / b["tokens_per_second"])
            out[f"{ours}_vs_{theirs}_fvu_ratio"] = a["fvu"] / b["fvu"]
    return out


def _zipf_quality(densities) -> dict | None:
    """Fit ``p(r) = C (r + 1)^-alpha`` to the sorted densities (bottom 10% of ranks left out,
    as aux_zipf does) and report alpha and R^2 in log-log space, over the fitted ranks and over
    the bottom tail the fit leaves out (the paper's Fig. 2: good except at the low end)."""
    if not densities:
        return None
    import torch

    from pertoken.sae.model import zipf_fit

    p = torch.tensor(sorted(densities, reverse=True), dtype=torch.float64)
    c, alpha = zipf_fit(p)
    r = torch.arange(1, p.numel() + 1, dtype=torch.float64)
    keep = int(math.ceil(p.numel() * 0.9))

    def r2(sl):
        ok = p[sl] > 0
        y, f = torch.log(p[sl][ok]), math.log(c) - alpha * torch.log(r[sl][ok] + 1)
        return float(1 - ((y - f) ** 2).sum() / ((y - y.mean()) ** 2).sum()) if ok.sum() > 2 else None

    return {"C": c, "alpha": alpha, "beta": 1.0, "r2_fitted_ranks": r2(slice(0, keep)),
            "r2_bottom_10pct": r2(slice(keep, None)),
            "zero_density_features": int((p == 0).sum())}


def _plots(rows, densities, histograms=None) -> list[dict]:
    """FVU against L0 in each mode, and the histograms of ``densities`` (one list per run) beside
    ``histograms`` already binned (kept from an earlier report)."""
    plots = []
    for mode in ("batch", "threshold"):
        series = {}
        for r in rows:
            if r["mode"] == mode or (mode == "threshold" and r["run"] in
                                     ("topk+auxk", "saelens-topk") and r["mode"] == "batch"):
                series.setdefault(r["run"], {"x": [], "y": []})
                series[r["run"]]["x"].append(r["l0"])
                series[r["run"]]["y"].append(r["fvu"])
        plots.append({"title": f"FVU against realised L0 ({mode} mode)", "series": series,
                      "xlabel": "realised L0", "ylabel": "held-out FVU", "logy": True})
    bins = [-8 + 0.5 * i for i in range(17)]
    hist = dict(histograms or {})
    for name, dens in densities.items():
        if not dens:
            continue
        counts = [0] * (len(bins) - 1)
        for p in dens:  # dead features (p = 0) and rarer than 1e-8 go to the first bin
            i = int((math.log10(p) - bins[0]) // 0.5) if p > 0 else 0
            counts[min(max(i, 0), len(counts) - 1)] += 1
        hist[name] = counts
    if hist:
        plots.append({"title": "Feature densities on held-out data (k = 32; dead in the "
                               "leftmost bin)", "kind": "bar", "x": [f"{b:g}" for b in bins[:-1]],
                      "series": hist, "xlabel": "log10 firing rate", "ylabel": "features"})
    return plots


if __name__ == "__main__":
    main()
