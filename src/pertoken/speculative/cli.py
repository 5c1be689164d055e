"""``pertoken speculative generate``: stream text as speculative decoding accepts it."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pertoken.errors import UserError


def _load_pair(model: str, draft: str | None, dtype: str, fp16_draft: bool = False):
    """``(target, tokenizer, draft or None)``, in the small-batch layout (a no-op but in
    float32 and bf16) and with grouped-query SDPA for tree passes (:func:`_for_trees`); every
    method, plain decoding included, then runs on the same model objects. A draft folder holding an
    EAGLE head loads as an :class:`~pertoken.speculative.eagle.EagleHead` bound to the target.
    With ``fp16_draft`` the draft runs on float16 weights
    (:func:`~pertoken.speculative.fp16.fp16_draft`), loaded in float32 whatever ``dtype``
    (:func:`_draft_dtype`)."""
    import torch

    from pertoken.models import load_model
    from pertoken.speculative.eagle import is_eagle, load_eagle
    from pertoken.speculative.tree import use_gqa_attention

    target, tokenizer = load_model(model, dtype=dtype)
    target = _for_trees(target)
    if not draft:
        return target, tokenizer, None
    if is_eagle(draft):
        head = load_eagle(draft, target, getattr(torch, _draft_dtype(dtype, fp16_draft)))
        model = use_gqa_attention(head.small_batch_layout())
        return target, tokenizer, _fp16(model) if fp16_draft else model
    return target, tokenizer, _draft_model(draft, dtype, fp16_draft)


def _draft_model(path: str, dtype: str, fp16_draft: bool):
    """A draft model (a transformers folder: ``--draft``, or bench's ``--assistant``) beside a
    ``dtype`` target, laid out for tree passes, on float16 weights with ``fp16_draft``."""
    from pertoken.models import load_model

    model = _for_trees(load_model(path, dtype=_draft_dtype(dtype, fp16_draft))[0])
    return _fp16(model) if fp16_draft else model


def _draft_dtype(dtype: str, fp16_draft: bool) -> str:
    """The dtype a draft loads in: float32 where it will run on fbgemm's float16 linears
    (which take float32 only), even beside a bfloat16 target; else the target's ``dtype``.
    Float16 weights are as small as bfloat16 ones, keep three more mantissa bits, and fbgemm's
    kernel is the faster: timed by hand at two threads, one call of the EAGLE head took 2.6 ms
    against 3.9 ms in bfloat16. Mixed dtypes are fine downstream: the draft only proposes,
    the target's logits decide."""
    from pertoken.speculative.fp16 import fp16_available

    return "float32" if fp16_draft and fp16_available() else dtype


def _fp16(draft):
    from pertoken.speculative.fp16 import fp16_draft

    return fp16_draft(draft)


def _for_trees(model):
    """``model`` laid out for passes over a few tokens: packed fp32 or bf16 weights
    (:func:`~pertoken.models.small_batch_layout`) and SDPA's grouped-query mode under tree
    masks (:func:`~pertoken.speculative.tree.use_gqa_attention`); outputs unchanged."""
    from pertoken.models import small_batch_layout
    from pertoken.speculative.tree import use_gqa_attention

    return use_gqa_attention(small_batch_layout(model))


def _check_draft_path(draft: str | None) -> None:
    from pertoken.models import resolve
    from pertoken.speculative.eagle import is_eagle

    if draft and not is_eagle(draft):
        resolve(draft)


def _generate(args) -> int:
    import torch

    from pertoken.speculative.generate import check_settings, generate

    check_settings(args.temperature, args.top_p, 1 if args.budget == "auto" else args.budget,
                   args.lookup, args.draft_temperature)
    if args.method != "ar" and not args.draft:
        raise UserError(f"--method {args.method} needs a --draft model")
    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer, draft = _load_pair(args.model, args.draft if args.method != "ar" else None,
                                          args.dtype, args.fp16_draft)
    budget, tree_costs = args.budget, None
    if budget == "auto" and draft is None:
        budget = 1
    elif budget == "auto":
        from pertoken.speculative.bench import (AUTO_MAX_BUDGET, auto_budget, cost_curve,
                                                sizes_trees)

        if sizes_trees(args.method, args.temperature, args.calibrate):
            budget = AUTO_MAX_BUDGET
            tree_costs = cost_curve(target, draft, args.model, args.draft)["target"]
        else:
            budget = auto_budget(target, draft, tokenizer, args.model, args.draft,
                                 args.temperature, args.top_k, args.top_p, args.draft_temperature,
                                 method=args.method, calibrate=args.calibrate)
    if args.chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": args.prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    else:
        ids = tokenizer.encode(args.prompt, add_special_tokens=False)
    produced: list[int] = []
    shown = 0

    def stream(tokens: list[int]) -> None:
        nonlocal shown
        produced.extend(tokens)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)

    start = time.perf_counter()
    out = generate(target, draft, list(ids), method=args.method, budget=budget,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                   seed=args.seed, calibration=args.calibrate, on_tokens=stream,
                   lookup=args.lookup, draft_temperature=args.draft_temperature,
                   tree_costs=tree_costs)
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{len(out.tokens)} tokens in {len(out.steps)} target calls "
          f"({out.tokens_per_call:.2f} per call), {len(out.tokens) / seconds:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def _default(value, default):
    return default if value is None else value


def _train_draft(args) -> int:
    import itertools
    from pathlib import Path

    import torch

    from pertoken.data import open_corpus
    from pertoken.models import load_model, resolve, resolve_device
    from pertoken.speculative.draft_train import (DraftTrainConfig, check_output, decode_seconds,
                                                  train_draft)

    if args.kind == "eagle":
        from pertoken.speculative.eagle_train import EagleTrainConfig, init_settings

        if args.init:  # the head's vocabulary and feature layers are kept (train_eagle checks)
            fixed = init_settings(args.init)
            args.feature_layers = args.feature_layers or fixed["feature_layers"]
            args.vocab = fixed["vocab"]
        cfg = EagleTrainConfig(vocab=args.vocab, seq_len=args.seq_len,
                               batch_size=_default(args.batch_size, 16),
                               data_tokens=_default(args.data_tokens, 400_000),
                               train_tokens=_default(args.train_tokens, 2_400_000),
                               lr=_default(args.lr, 1e-3), top_k=_default(args.top_k, 16),
                               checkpoint_every=args.checkpoint_every, seed=args.seed,
                               self_chat=args.self_chat,
                               self_chat_temperature=args.self_chat_temperature,
                               feature_layers=args.feature_layers, init=args.init or "")
    else:
        if args.feature_layers:
            raise UserError("--feature-layers is for --kind eagle heads")
        cfg = DraftTrainConfig(hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                               intermediate_size=args.intermediate_size, seq_len=args.seq_len,
                               batch_size=_default(args.batch_size, 8),
                               train_tokens=_default(args.train_tokens, 3_000_000),
                               lr=_default(args.lr, 3e-3), top_k=_default(args.top_k, 64),
                               checkpoint_every=args.checkpoint_every, seed=args.seed,
                               self_chat=args.self_chat,
                               self_chat_temperature=args.self_chat_temperature,
                               init=args.init or "")
    cfg.validate()
    check_output(args.output, args.resume, cfg)
    resolve(args.target)
    device = resolve_device(args.device)
    if args.kind == "model" and args.init and not Path(args.init, "config.json").is_file():
        raise UserError(f"--init {args.init}: not a draft folder (no config.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    corpora = [open_corpus(name, text_field=args.text_field)
               for name in args.corpus.split(",") if name]
    if not corpora:
        raise UserError("--corpus names no corpus")
    target, tokenizer = load_model(args.target, dtype=args.teacher_dtype)
    target.to(device)
    documents = itertools.chain.from_iterable(c.documents("train") for c in corpora)
    if args.kind == "eagle":
        from pertoken.speculative.eagle import head_decode_seconds, load_eagle
        from pertoken.speculative.eagle_train import train_eagle

        info = train_eagle(target, tokenizer, documents, args.output, cfg,
                           resume=args.resume, target_name=args.target)
    else:
        info = train_draft(target, tokenizer, documents, args.output, cfg,
                           resume=args.resume, target_name=args.target)
    # the cost ratio below is measured on the CPU in float32 (an EAGLE head reads the target's
    # embeddings and LM head, so it loads onto the converted target)
    target = target.float().cpu()
    if args.kind == "eagle":
        draft = load_eagle(args.output, target)
        t_draft = head_decode_seconds(draft)
        info_name = "pertoken-eagle.json"
    else:
        draft = load_model(args.output)[0]
        t_draft = decode_seconds(draft)
        info_name = "pertoken-draft.json"
    # the cost ratio, measured on the CPU in float32 with the draft just written
    t_target = decode_seconds(target)
    from pertoken.atomic import write_json_atomic

    saved = json.loads(Path(args.output, info_name).read_text())
    saved["cost"] = {"target_decode_ms": 1000 * t_target, "draft_decode_ms": 1000 * t_draft,
                     "ratio": t_draft / t_target, "threads": torch.get_num_threads(),
                     "dtype": "float32",
                     "draft_parameters": sum(p.numel() for p in draft.parameters())}
    write_json_atomic(Path(args.output, info_name), saved)
    last = info["history"][-1]
    heldout = (f", held-out {last['heldout_top1_agreement']:.3f}"
               if "heldout_top1_agreement" in last else "")
    print(f"draft written to {args.output}: {info['step']} steps, loss {last['loss']:.3f}, "
          f"top-1 agreement {last['top1_agreement']:.3f}{heldout}; one decode step "
          f"{1000 * t_draft:.1f} ms vs target {1000 * t_target:.1f} ms "
          f"({t_draft / t_target:.3f}x)")
    return 0


def _budget(text: str):
    import argparse

    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _numbers(kind):
    def parse(text: str) -> list:
        import argparse

        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}") from None
    return parse


def _bench(args) -> int:
    import torch

    from pertoken.atomic import write_json_atomic
    from pertoken.models import resolve
    from pertoken.speculative.bench import BenchConfig, run_bench

    cfg = BenchConfig(model=args.model, draft=args.draft, methods=args.methods,
                      budgets=args.budgets, temperatures=args.temperatures, prompts=args.prompts,
                      max_new_tokens=args.max_new_tokens, prompt_tokens=args.prompt_tokens,
                      repeats=args.repeats, dtype=args.dtype, top_k=args.top_k, top_p=args.top_p,
                      calibrate=args.calibrate, assistant=args.assistant, lookup=args.lookup,
                      fp16_draft=args.fp16_draft, draft_temperature=args.draft_temperature)
    cfg.validate()
    resolve(args.model)
    _check_draft_path(args.draft)
    if args.assistant:
        resolve(args.assistant)
    torch.set_num_threads(args.threads)
    target, tokenizer, draft = _load_pair(args.model, args.draft, args.dtype, args.fp16_draft)
    assistant = None
    if args.assistant:
        assistant = _draft_model(args.assistant, args.dtype, args.fp16_draft)
    for model in (draft, assistant):
        if model is not None and model.config.vocab_size != target.config.vocab_size:
            raise UserError("the draft and the target have different vocabularies "
                            f"({model.config.vocab_size} vs {target.config.vocab_size})")
    result = run_bench(target, draft, tokenizer, cfg, assistant=assistant)
    if args.json:
        write_json_atomic(args.json, result)
    for row in result["results"]:
        speed = row["speedup_vs_ar"]
        print(f"{row['method']:<12} budget {str(row['budget']):>4}  T={row['temperature']:<4} "
              f"{row['tokens_per_call']:.2f} tokens/call  {row['tokens_per_second']:.1f} tokens/s"
              + (f"  {speed:.2f}x ar" if speed else ""))
    return 0


def _add_pair_and_drafting(p, default_model: str) -> None:
    """The options ``generate`` and ``bench`` share: the model pair and how DySpec drafts."""
    p.add_argument("--model", default=default_model, help="the target model")
    p.add_argument("--draft", help="the draft: a model folder with the same vocabulary, or an "
                                   "EAGLE head folder trained for this target")
    p.add_argument("--calibrate", action="store_true",
                   help="DySpec values from an online acceptance calibration")
    p.add_argument("--lookup", type=int, default=4, metavar="N",
                   help="greedy dyspec: graft up to N prompt-lookup tokens into each tree "
                        "(out of the budget; 0: off)")
    p.add_argument("--draft-temperature", type=float, default=None, metavar="T",
                   help="the draft's softmax temperature, which shapes the tree and (when "
                        "sampling) the drafts' law (default 1.0 for an EAGLE head, 0.6 for a "
                        "draft model); the output law stays the target's")
    p.add_argument("--fp16-draft", action=argparse.BooleanOptionalAction, default=True,
                   help="run the draft (and bench's --assistant) in float32 on float16 "
                        "weights, whatever --dtype: faster draft calls, the output "
                        "unchanged (default: on)")


def add_commands(commands, parser_class, positive_int) -> None:
    """Add ``speculative generate`` to the top-level subparsers."""
    from pertoken.models import DEFAULT_MODEL
    from pertoken.speculative.methods import METHODS

    group = commands.add_parser("speculative", help="lossless speculative decoding (DySpec)")
    verbs = group.add_subparsers(dest="verb", required=True, parser_class=parser_class)
    p = verbs.add_parser("generate", help="generate text, streaming it as it is accepted")
    _add_pair_and_drafting(p, DEFAULT_MODEL)
    p.add_argument("--method", default="dyspec", choices=list(METHODS))
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--budget", type=_budget, default=8,
                   help="drafted tokens per step, or auto: greedy dyspec sizes each tree from "
                   "this machine's measured pass costs (up to 16), other methods take the "
                   "budget those costs and the measured acceptance favour")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    p.set_defaults(func=_generate)

    p = verbs.add_parser("bench", help="compare decoding methods on the same prompts")
    _add_pair_and_drafting(p, DEFAULT_MODEL)
    p.add_argument("--methods", type=_numbers(str), default="ar,chain,tree,dyspec,hf-assisted",
                   help="comma-separated: ar, chain, tree, dyspec, dyspec-heap, hf-assisted, hf-ar")
    p.add_argument("--budgets", type=_numbers(_budget), default="4,8,16",
                   help="comma-separated tree budgets (auto: measured)")
    p.add_argument("--temperatures", type=_numbers(float), default="0,1")
    p.add_argument("--prompts", default="wiki-en:8", help="CORPUS:N (held-out) or chat:N")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--prompt-tokens", type=positive_int, default=128)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--assistant", help="the standalone draft model hf-assisted uses (default: "
                                       "--draft, unless that is an EAGLE head)")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=_bench)

    p = verbs.add_parser("train-draft", help="train a draft for a target: a small model "
                                             "distilled from it, or an EAGLE head on its features")
    p.add_argument("--target", default=DEFAULT_MODEL, help="the target model")
    p.add_argument("--kind", default="model", choices=["model", "eagle"],
                   help="model: a standalone Llama (works with transformers' assisted "
                        "generation too); eagle: one decoder layer on the target's features")
    p.add_argument("--corpus", default="docs-en",
                   help="training text (train split); several as a comma-separated list")
    p.add_argument("--self-chat", type=int, default=0, metavar="N",
                   help="first train on N conversations sampled from the target itself "
                        "(on-policy chat data; generated once, resumable)")
    p.add_argument("--self-chat-temperature", type=float, default=0.8, metavar="T",
                   help="temperature of the target's answers in those chats (0: greedy, the "
                        "text greedy decoding produces; default 0.8)")
    p.add_argument("--init", help="start from this draft folder or EAGLE head (fine-tuning); "
                                  "the architecture flags (a head's vocabulary and feature "
                                  "layers) are then taken from it")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("-o", "--output", required=True, help="folder for the draft")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--hidden-size", type=positive_int, default=128)
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--kv-heads", type=positive_int, default=2)
    p.add_argument("--intermediate-size", type=positive_int, default=384)
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="sequences per step (default 8; eagle 16)")
    p.add_argument("--train-tokens", type=positive_int, default=None,
                   help="tokens the draft sees (default 3M; eagle 2.4M, epochs over the "
                        "cached teacher pass)")
    p.add_argument("--data-tokens", type=positive_int, default=None,
                   help="eagle: tokens the teacher runs over, once (default 400k)")
    p.add_argument("--feature-layers", default="", metavar="I,J",
                   help="eagle: decoder layers whose (normalised) outputs the head reads "
                        "beside the final feature, as EAGLE-3 does (default: none)")
    p.add_argument("--vocab", type=positive_int, default=8192,
                   help="eagle: draftable tokens, the most frequent in the training data")
    p.add_argument("--lr", type=float, default=None, help="default 3e-3; eagle 1e-3")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="teacher tokens distilled (default 64; eagle 16)")
    p.add_argument("--checkpoint-every", type=positive_int, default=50, help="steps")
    p.add_argument("--teacher-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="auto",
                   help="where the teacher runs and the draft trains: auto (CUDA when there "
                        "is one), cpu, cuda or cuda:N; the cost is measured on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    p.set_defaults(func=_train_draft)
