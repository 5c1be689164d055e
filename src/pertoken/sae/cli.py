"""``pertoken sae ...`` commands (so far: ``cache``)."""

from __future__ import annotations

from pertoken.errors import UserError


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("-o", "--output", required=True, help="folder for the store")
    p.set_defaults(func=_cache)
