"""``pertoken sae ...`` commands: ``cache``, ``train``, ``calibrate`` and ``eval``."""

from __future__ import annotations

import logging

from pertoken.errors import UserError

log = logging.getLogger(__name__)


def _layer_count(name: str) -> int | None:
    """The model's decoder layer count read from its ``config.json`` without loading weights
    (None when there is none to read yet, as for an alias not converted so far)."""
    import json
    from pathlib import Path

    from pertoken.models import converted_dir, resolve

    kind, where = resolve(name)
    folder = converted_dir(name) if kind == "alias" else where if kind == "folder" else None
    config = Path(folder) / "config.json" if folder else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("num_hidden_layers")


def _cache(args) -> int:
    import torch

    from pertoken.data import open_corpus
    from pertoken.models import load_model
    from pertoken.sae.cache import CacheConfig, cache_activations, check_layer

    cfg = CacheConfig(layer=args.layer, tokens=args.tokens, context=args.context,
                      outlier_ratio=args.outlier_ratio,
                      skip_first=not args.keep_first, batch_size=args.batch_size,
                      shard_tokens=args.shard_tokens, seed=args.seed)
    cfg.validate()
    count = _layer_count(args.model)
    if args.layer < 0 or (count is not None and args.layer >= count):
        raise UserError(f"layer {args.layer} does not exist: the model has layers 0-{count - 1}"
                        if count else f"layer {args.layer} does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = open_corpus(args.corpus, text_field=args.text_field)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    check_layer(model, args.layer)
    meta = cache_activations(model, tokenizer, corpus.documents(args.split), args.output, cfg,
                             model_name=args.model, corpus=f"{args.corpus}/{args.split}",
                             resume=args.resume)
    print(f"{meta['tokens']} activations of layer {args.layer} (d={meta['d_in']}) in "
          f"{len(meta['shards'])} shards at {args.output}")
    return 0


def _eval(args) -> int:
    import torch

    from pertoken.atomic import write_json_atomic
    from pertoken.sae.cache import ActivationStore
    from pertoken.sae.metrics import evaluate
    from pertoken.sae.io import hook_layer, load, read_config, training_batch

    config = read_config(args.sae)
    sae = load(args.sae)
    store = ActivationStore(args.acts)
    if store.d_in != sae.cfg.d_in:
        raise UserError(f"the SAE reads {sae.cfg.d_in}-dimensional activations but {args.acts} "
                        f"holds {store.d_in}-dimensional ones")
    sae_layer = hook_layer((config.get("metadata") or {}).get("hook_name"))
    store_layer = store.meta.get("layer")
    if sae_layer is not None and store_layer is not None and sae_layer != store_layer:
        raise UserError(f"the SAE was trained on layer {sae_layer} but {args.acts} holds layer "
                        f"{store_layer}")
    layer = sae_layer if sae_layer is not None else store_layer
    ce_plan = _ce_plan(args, store, layer) if args.model else None  # fail before evaluating
    if args.threads:
        torch.set_num_threads(args.threads)
    trained_batch, capacities = training_batch(config)
    if capacities is not None and trained_batch != args.batch_size:
        log.warning("the SAE's Feature Choice capacities are for batches of %s: batch mode at "
                    "%d uses uniform ones", trained_batch, args.batch_size)
        capacities = None
    metrics = evaluate(sae, store, tokens=args.tokens, batch_size=args.batch_size,
                       mode=args.mode, capacities=capacities)
    ce = _ce(args, sae, layer, *ce_plan) if ce_plan else None
    out = {"sae": str(args.sae), "acts": str(args.acts), **metrics,
           "ce_loss_recovered": ce["ce_loss_recovered"] if ce else None, "ce": ce,
           "model": args.model, "layer": layer}
    if args.json:
        write_json_atomic(args.json, out)
    q = metrics["l0_quantiles"]
    batch = f", B={metrics['batch_size']}" if metrics["mode"] == "batch" else ""
    print(f"{sae.cfg.arch} SAE (width {sae.cfg.width}, k {sae.cfg.k}), {metrics['mode']} mode"
          f"{batch}, {metrics['eval_tokens']:,} tokens")
    print(f"FVU {metrics['fvu']:.4f}  L0 {metrics['l0']:.2f} (p10 {q['p10']:g}, median "
          f"{q['p50']:g}, p90 {q['p90']:g})  dead {metrics['dead_features']}/{sae.cfg.width} "
          f"({100 * metrics['dead_fraction']:.2f}%)")
    if ce:
        print(f"CE loss recovered {ce['ce_loss_recovered']:.4f}  delta CE {ce['delta_ce']:.4f}  "
              f"KL score {ce['kl_score']:.4f} over {ce['tokens']:,} tokens "
              f"(clean {ce['ce_clean']:.4f}, SAE {ce['ce_sae']:.4f}, zero {ce['ce_zero']:.4f})")
    return 0


def _ce_plan(args, store, layer) -> tuple:
    """``(documents, context, outlier ratio)`` for the CE loss, checked before anything heavy
    runs; the splice leaves alone the outlier tokens the store's cache dropped."""
    from pertoken.data import open_corpus

    settings = store.meta.get("settings", {})
    if layer is None:
        raise UserError("neither the SAE nor the store says which layer it reads: the CE loss "
                        "needs one")
    count = _layer_count(args.model)
    if count is not None and layer >= count:
        raise UserError(f"layer {layer} does not exist in {args.model}: it has layers "
                        f"0-{count - 1}")
    # the store records its corpus as "<corpus>/<split>"
    corpus = args.corpus or (settings.get("corpus") or "").rsplit("/", 1)[0]
    if not corpus:
        raise UserError("the store does not name its corpus: pass --corpus for the CE loss")
    documents = open_corpus(corpus, text_field=args.text_field).documents(args.split)
    return (documents, args.context or settings.get("context") or 256,
            settings.get("outlier_ratio", 0.0))


def _ce(args, sae, layer: int, documents, context: int, outlier_ratio: float) -> dict:
    """CE loss recovered of ``sae`` spliced into ``--model``."""
    from pertoken.models import load_model
    from pertoken.sae.cache import check_layer
    from pertoken.sae.metrics import ce_loss_recovered

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    check_layer(model, layer)
    return ce_loss_recovered(sae, model, tokenizer, documents, layer, args.sequences,
                             context=context, batch_size=args.ce_batch_size,
                             outlier_ratio=outlier_ratio)


def _train(args) -> int:
    """Train one SAE; under ``torchrun`` every rank runs this with the same arguments."""
    import os

    import torch

    from pertoken.sae.cache import ActivationStore
    from pertoken.sae.model import SAEConfig
    from pertoken.sae.train import TrainConfig, train_sae

    sae_cfg = SAEConfig(d_in=1, width=args.width, k=args.k, arch=args.arch, aux=args.aux,
                        aux_k=args.aux_k, aux_coef=args.aux_coef, aux_relu=not args.aux_raw,
                        aux_scale_by_dead=args.aux_scale_by_dead, zipf_tau=args.zipf_tau,
                        zipf_weighting=args.zipf_weighting, capacities=args.capacities,
                        capacity_alpha=args.capacity_alpha, capacity_beta=args.capacity_beta)
    sae_cfg.validate()
    cfg = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=args.warmup_steps, dead_tokens=args.dead_tokens,
                      grad_clip=args.grad_clip, checkpoint_every=args.checkpoint_every,
                      calibration_batches=args.calibration_batches, seed=args.seed)
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    store = ActivationStore(args.acts)
    sae_cfg.d_in = store.d_in
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    finished = False
    try:
        summary = train_sae(store, args.output, sae_cfg, cfg, resume=args.resume)
        finished = True
    finally:
        if distributed:
            _close_process_group(finished)
    if int(os.environ.get("RANK", "0")) == 0:
        final = summary["final"]
        print(f"{args.arch} SAE (width {args.width}, k {args.k}, aux {args.aux}) after "
              f"{summary['tokens']:,} tokens: FVU {final.get('fvu', float('nan')):.4f}, "
              f"L0 {final.get('l0', float('nan')):.2f}, dead {final.get('dead', 0)}; "
              f"{summary['tokens_per_second']:,.0f} tokens/s; saved to {args.output}")
    return 0


def _close_process_group(finished: bool) -> None:
    """Close gloo one rank at a time, the last rank first.

    After a barrier no collective is in flight; each rank then destroys its process group only
    once every higher rank has destroyed theirs, which it learns from the rendezvous store rather
    than from gloo. Ranks closing their pairs at the same moment aborted one of them, rarely, with
    "terminate called without an active exception" (seen in CI, even after a barrier). A rank
    whose training failed closes at once: its peers are stopped by the same error or by torchrun.
    """
    import torch.distributed as dist

    if not finished:
        dist.destroy_process_group()
        return
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    if rank + 1 < world:
        store.wait([f"pertoken/closed/{rank + 1}"])
    dist.destroy_process_group()
    store.set(f"pertoken/closed/{rank}", "1")


def _calibrate(args) -> int:
    import numpy as np
    import torch

    from pertoken.sae.cache import ActivationStore
    from pertoken.sae.io import load, read_config, save_sae, training_batch
    from pertoken.sae.train import calibrate_thresholds

    config = read_config(args.sae)
    sae = load(args.sae)
    if not sae.cfg.batch_dependent:
        raise UserError(f"{args.sae} is a {sae.cfg.arch} SAE: only Mutual Choice, BatchTopK and "
                        "Feature Choice SAEs have inference thresholds")
    store = ActivationStore(args.acts)
    if store.d_in != sae.cfg.d_in:
        raise UserError(f"the SAE reads {sae.cfg.d_in}-dimensional activations but {args.acts} "
                        f"holds {store.d_in}-dimensional ones")
    trained_batch, capacities = training_batch(config)
    batch = args.batch_size or trained_batch or 4608
    if capacities is not None and batch != trained_batch:
        raise UserError(f"this SAE's Feature Choice capacities are for batches of "
                        f"{trained_batch}: calibrate with --batch-size {trained_batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    n = min(args.batches, max(1, len(store) // batch))
    before = sae.threshold.clone()
    calibrate_thresholds(sae, (store.rows(np.arange(i * batch, (i + 1) * batch) % len(store))
                               for i in range(n)), batch, capacities)
    save_sae(sae, args.sae, metadata=config.get("metadata"), batch_size=trained_batch,
             capacities=capacities, folded_scale=config["pertoken"].get("scale"))
    finite = torch.isfinite(before) & torch.isfinite(sae.threshold)
    print(f"{sae.cfg.arch} SAE at {args.sae}: thresholds from {n} batches of {batch:,} "
          f"activations; mean {float(before[finite].mean()):.4g} -> "
          f"{float(sae.threshold[finite].mean()):.4g} (raw units)")
    return 0


def add_commands(commands, parser_class, positive_int) -> None:
    from pertoken.models import DEFAULT_MODEL

    group = commands.add_parser("sae", help="sparse autoencoders on model activations")
    verbs = group.add_subparsers(dest="verb", required=True, parser_class=parser_class)
    p = verbs.add_parser("cache", help="store residual-stream activations of one layer")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--layer", type=int, required=True,
                   help="decoder layer whose output (the residual stream after it) is stored")
    p.add_argument("--corpus", default="docs-en")
    p.add_argument("--split", default="train", choices=["train", "heldout", "all"])
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--tokens", type=positive_int, required=True)
    p.add_argument("--context", type=positive_int, default=256)
    p.add_argument("--keep-first", action="store_true",
                   help="keep position 0 of each sequence (dropped by default)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--shard-tokens", type=positive_int, default=65_536)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--outlier-ratio", type=float, default=3.0,
                   help="drop attention-sink and other massive-activation tokens, whose norm "
                        "exceeds this many times the batch's median (0: keep all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("-o", "--output", required=True, help="folder for the store")
    p.set_defaults(func=_cache)

    p = verbs.add_parser("train", help="train an SAE on a cached activation store "
                                       "(runs unchanged under torchrun)")
    p.add_argument("--acts", required=True, help="activation store (pertoken sae cache)")
    p.add_argument("--arch", default="topk",
                   choices=["topk", "batchtopk", "mutual-choice", "feature-choice"])
    p.add_argument("--width", type=positive_int, default=4608, help="dictionary size F")
    p.add_argument("--k", type=positive_int, default=32, help="features per token (budget kB)")
    p.add_argument("--aux", default="auxk", choices=["none", "auxk", "zipf"])
    p.add_argument("--aux-k", type=int, default=0, help="latents in the aux loss (0: d_in / 2)")
    p.add_argument("--aux-coef", type=float, default=1 / 32)
    p.add_argument("--aux-raw", action="store_true",
                   help="aux loss on raw pre-activations (SAELens) instead of their ReLU (OpenAI)")
    p.add_argument("--aux-scale-by-dead", action="store_true",
                   help="scale the aux loss by min(candidates / aux-k, 1) (SAELens, sparsify)")
    p.add_argument("--zipf-tau", type=float, default=4.0,
                   help="aux_zipf: under-used below the Zipf fit / tau")
    p.add_argument("--zipf-weighting", action="store_true",
                   help="aux_zipf: weight candidates by min(1, log(fit/p)/log tau)")
    p.add_argument("--capacities", default="uniform", choices=["uniform", "zipf"],
                   help="Feature Choice capacities")
    p.add_argument("--capacity-alpha", type=float, default=0.0,
                   help="Zipf capacities' exponent (0: fitted to the features' TopK demand)")
    p.add_argument("--capacity-beta", type=float, default=1.0)
    p.add_argument("--tokens", type=positive_int, required=True, help="training tokens")
    p.add_argument("--batch-size", type=positive_int, default=4608,
                   help="tokens per step over all processes")
    p.add_argument("--lr", type=float, default=0.0, help="0: 2e-4 / sqrt(width / 2^14)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--dead-tokens", type=int, default=0,
                   help="tokens without firing before a latent counts as dead "
                        "(0: a quarter of --tokens, at most 10M)")
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--checkpoint-every", type=positive_int, default=50, help="steps")
    p.add_argument("--calibration-batches", type=int, default=16,
                   help="Mutual/Feature Choice: set the inference thresholds from this many of "
                        "the last batches under the final weights (0: keep the running means)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("-o", "--output", required=True, help="folder for the SAE")
    p.set_defaults(func=_train)

    p = verbs.add_parser("calibrate", help="set a Mutual/Feature Choice SAE's inference "
                         "thresholds from its weights on (training) activations, in place")
    p.add_argument("--sae", required=True, help="SAE folder written by pertoken (SAELens layout)")
    p.add_argument("--acts", required=True, help="activation store, normally the training one")
    p.add_argument("--batches", type=positive_int, default=16)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="global batch B of the selection (default: the training batch)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.set_defaults(func=_calibrate)

    p = verbs.add_parser("eval", help="FVU, L0, dead fraction and CE loss recovered of a saved SAE")
    p.add_argument("--sae", required=True, help="SAE folder written by pertoken (SAELens layout)")
    p.add_argument("--acts", required=True, help="held-out activation store (pertoken sae cache)")
    p.add_argument("--tokens", type=positive_int, default=None,
                   help="tokens to evaluate (default: all)")
    p.add_argument("--mode", choices=["batch", "threshold"], default=None,
                   help="codes by the batch selection rule or token by token (default: threshold "
                        "for Mutual/Feature Choice, batch for TopK)")
    p.add_argument("--batch-size", type=positive_int, default=4608,
                   help="tokens per batch in batch mode: use the training B")
    p.add_argument("--model", default=None,
                   help="model for CE loss recovered (alias, folder or .gguf; none: skip CE)")
    p.add_argument("--corpus", default=None, help="corpus for CE loss (default: the store's)")
    p.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--sequences", type=positive_int, default=64,
                   help="sequences scored for CE loss")
    p.add_argument("--context", type=positive_int, default=None,
                   help="tokens per sequence for CE loss (default: the store's context)")
    p.add_argument("--ce-batch-size", type=positive_int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--json", default=None, help="write the metrics as JSON here")
    p.set_defaults(func=_eval)
