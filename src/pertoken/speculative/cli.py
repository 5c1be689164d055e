"""``pertoken speculative generate``: stream text as speculative decoding accepts it."""

from __future__ import annotations

import sys
import time

from pertoken.errors import UserError


def _generate(args) -> int:
    import torch

    from pertoken.models import load_model
    from pertoken.speculative.generate import check_settings, generate

    check_settings(args.temperature, args.top_p, args.budget)  # before loading any model
    if args.method != "ar" and not args.draft:
        raise UserError(f"--method {args.method} needs a --draft model")
    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_model(args.model)
    draft = load_model(args.draft)[0] if args.method != "ar" else None
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
    out = generate(target, draft, list(ids), method=args.method, budget=args.budget,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                   seed=args.seed, on_tokens=stream)
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{len(out.tokens)} tokens in {len(out.steps)} target calls "
          f"({out.tokens_per_call:.2f} per call), {len(out.tokens) / seconds:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def add_commands(commands, parser_class, positive_int) -> None:
    """Add ``speculative generate`` to the top-level subparsers."""
    from pertoken.models import DEFAULT_MODEL
    from pertoken.speculative.methods import METHODS

    group = commands.add_parser("speculative", help="lossless speculative decoding (DySpec)")
    verbs = group.add_subparsers(dest="verb", required=True, parser_class=parser_class)
    p = verbs.add_parser("generate", help="generate text, streaming it as it is accepted")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the target model")
    p.add_argument("--draft", help="the draft model (same vocabulary)")
    p.add_argument("--method", default="dyspec", choices=list(METHODS))
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--budget", type=int, default=8, help="drafted tokens per step")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    p.set_defaults(func=_generate)
