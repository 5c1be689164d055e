"""``pertoken quant quantize``: calibrate a model on a corpus and save it on integer kernels."""

from __future__ import annotations

from pertoken.errors import UserError


def calibration_batches(tokenizer, documents, tokens: int, length: int, batch_size: int = 1):
    """Token-id batches (batch, length) for calibration: documents joined by EOS and cut into
    windows of ``length`` tokens, up to ``tokens`` tokens (the last window may be shorter)."""
    import torch

    from pertoken.evaluate import token_stream

    ids, _, _, _ = token_stream(tokenizer, documents, tokens)
    ids = ids[:tokens]
    if not ids:
        raise UserError("the calibration set is empty: the corpus gave no tokens")
    windows = [ids[i:i + length] for i in range(0, len(ids), length)]
    full = [w for w in windows if len(w) == length]
    batches = [torch.tensor(full[i:i + batch_size]) for i in range(0, len(full), batch_size)]
    if len(windows[-1]) < length:
        batches.append(torch.tensor([windows[-1]]))
    return batches


def parse_calibration(text: str) -> list[tuple[str, int]]:
    """``CORPUS:TOKENS[,CORPUS:TOKENS...]`` as (corpus, tokens) pairs."""
    parts = []
    for part in text.split(","):
        corpus, _, count = part.rpartition(":")
        if not corpus or not count.lstrip("-").isdigit():
            raise UserError(f"--calib takes CORPUS:TOKENS[,CORPUS:TOKENS...], got {text!r}")
        if int(count) < 1:
            raise UserError(f"calibration tokens must be at least 1, got {count}")
        parts.append((corpus, int(count)))
    return parts


def mixed_calibration_batches(tokenizer, parts: list[tuple], length: int):
    """:func:`calibration_batches` from the train split of each corpus in ``parts`` (pairs of
    a corpus name, or a corpus already opened, and a token count), one after the other (static
    scales must cover every kind of text the model will see)."""
    from pertoken.data import open_corpus

    batches = []
    for corpus, tokens in parts:
        corpus = open_corpus(corpus) if isinstance(corpus, str) else corpus
        batches += calibration_batches(tokenizer, corpus.documents("train"), tokens, length)
    return batches


def _parse_alpha(text: str) -> float | None:
    if text == "off":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--dynamic-alpha takes a number in [0, 1] or 'off', got {text!r}") \
            from None


def check_family(name: str) -> None:
    """Fail early, before loading weights, on a model folder whose family is not supported
    (its architecture built on the meta device from ``config.json``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pertoken.models import resolve
    from pertoken.quant.convert import linear_groups

    kind, where = resolve(name)
    if kind != "folder":
        return
    config = AutoConfig.from_pretrained(str(where), local_files_only=True)
    with torch.device("meta"):
        linear_groups(AutoModelForCausalLM.from_config(config))


def _quantize(args) -> int:
    from dataclasses import asdict

    import torch

    from pertoken.data import open_corpus
    from pertoken.models import load_model
    from pertoken.quant.convert import QuantConfig, quantize_model
    from pertoken.quant.io import save_quantized

    cfg = QuantConfig(method=args.method, w_bits=args.w_bits, a_bits=args.a_bits,
                      shift=not args.no_shift, shift_mode=args.shift_mode, weights=args.weights,
                      smooth_alpha=args.alpha, head=args.head,
                      dynamic_alpha=_parse_alpha(args.dynamic_alpha))
    cfg.validate()
    parts = parse_calibration(args.calib)
    tokens = sum(count for _, count in parts)
    check_family(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    # opened before the model loads, so that a missing corpus fails first
    opened = [(open_corpus(corpus), count) for corpus, count in parts]
    model, tokenizer = load_model(args.model, dtype="float32")
    batches = mixed_calibration_batches(tokenizer, opened, args.length)
    folded = quantize_model(model, batches, cfg)
    settings = {**asdict(cfg),
                "calibration": {"corpus": args.calib, "split": "train", "tokens": tokens,
                                "parts": [{"corpus": c, "tokens": n} for c, n in parts],
                                "length": args.length},
                "source_model": args.model,
                "folded": {name: {key: value.tolist() if isinstance(value, torch.Tensor)
                                  else value for key, value in f.items()}
                           for name, f in folded.items()}}
    save_quantized(model, tokenizer, args.output, settings,
                   embedding_dtype=None if args.embedding_dtype == "float32"
                   else args.embedding_dtype)
    print(f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits} ({cfg.weights} weights"
          f"{', shift' if cfg.method == 'outliertune' and cfg.shift else ''}) of {args.model}, "
          f"calibrated on {tokens:,} tokens of {args.calib}: saved to {args.output}")
    return 0


def add_commands(commands, parser_class, positive_int) -> None:
    from pertoken.models import DEFAULT_MODEL
    from pertoken.quant.convert import METHODS, WEIGHT_QUANTIZERS

    group = commands.add_parser("quant", help="activation and weight quantization on integer "
                                "kernels (OutlierTune)")
    verbs = group.add_subparsers(dest="verb", required=True, parser_class=parser_class)
    p = verbs.add_parser("quantize", help="calibrate a model and save it quantized")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--method", default="outliertune", choices=METHODS)
    p.add_argument("--w-bits", type=int, default=8, help="weight bits: 8, 6 or 4")
    p.add_argument("--a-bits", type=int, default=8, help="activation bits: 8 or 6")
    p.add_argument("--no-shift", action="store_true",
                   help="OutlierTune without the symmetrizing shift (the ablation)")
    p.add_argument("--shift-mode", default="mean", choices=["mean", "global"])
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength")
    p.add_argument("--dynamic-alpha", default="0.6",
                   help="OutlierTune: migrate the o_proj/down_proj inputs' outlier channels at "
                   "this alpha, folded into v_proj/up_proj; 'off' keeps plain per-token inputs")
    p.add_argument("--weights", default="rtn_asym", choices=list(WEIGHT_QUANTIZERS),
                   help="weight rounding")
    p.add_argument("--head", action="store_true",
                   help="also quantize the output head (W8A8 per token); a tied embedding then "
                   "reads the head's int8 codes")
    p.add_argument("--embedding-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="how a float input embedding (shared by a tied head) is stored")
    p.add_argument("--calib", default="wiki-en:8192",
                   help="calibration data CORPUS:TOKENS, or several joined by commas, from each "
                   "corpus's train split (calibrate on text like what the model will read)")
    p.add_argument("--length", type=positive_int, default=512, help="tokens per sequence")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("-o", "--output", required=True, help="folder for the quantized model")
    p.set_defaults(func=_quantize)
