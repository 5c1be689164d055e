"""``pertoken <command> <verb>``: the command line.

Each method adds its own subcommands here as it lands. A :class:`~pertoken.errors.UserError`
(or a bad flag) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pertoken.errors import UserError

log = logging.getLogger("pertoken")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (not usage plus error)."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise UserError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _print_json_or_table(rows: list[dict], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


# ---------------------------------------------------------------------------------------------
# models

def _models_list(args) -> int:
    from pertoken.models import list_models

    rows = list_models()
    for row in rows:
        row["cached"] = "yes" if row["cached"] else "no"
        row["package"] = "installed" if row["gguf"] else f"missing: {row['install']}"
    _print_json_or_table(rows, ["alias", "cached", "package", "description"], args.json)
    return 0


# ---------------------------------------------------------------------------------------------
# data

def _data_list(args) -> int:
    from pertoken.data import list_corpora

    rows = list_corpora()
    for row in rows:
        if row["built"]:
            row["size"] = f"{row['bytes']:,} bytes, {row['documents']:,} docs"
        elif row["needs"]:
            row["size"] = f"not built (needs {', '.join(row['needs'])})"
        else:
            row["size"] = "not built"
    _print_json_or_table(rows, ["name", "language", "size", "description"], args.json)
    return 0


def _data_build(args) -> int:
    from pertoken.data import build_corpus

    for name in args.names:
        meta = build_corpus(name, install=True, force=args.force)
        parts = ", ".join(f"{s} {v['documents']:,} docs / {v['bytes']:,} bytes"
                          for s, v in meta["splits"].items())
        print(f"{name}: {parts}")
    return 0


# ---------------------------------------------------------------------------------------------
# eval

def _eval_ppl(args) -> int:
    import torch

    from pertoken.atomic import write_json_atomic
    from pertoken.data import open_corpus
    from pertoken.evaluate import PerplexityConfig, perplexity
    from pertoken.models import load_model, resolve

    resolve(args.model)  # a wrong model name fails before any corpus is built
    config = PerplexityConfig(window=args.window, stride=args.stride or args.window // 2,
                              max_tokens=args.max_tokens or None, batch_size=args.batch_size,
                              separator=args.separator)
    config.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = open_corpus(args.corpus, text_field=args.text_field)
    model, tokenizer = load_model(args.model, dtype=args.dtype,
                                  attn_implementation=args.attn_implementation)
    result = perplexity(model, tokenizer, corpus.documents(args.split), config)
    out = {"model": args.model, "corpus": args.corpus, "split": args.split,
           "tokens": result.tokens, "bytes": result.bytes, "perplexity": result.perplexity,
           "bits_per_byte": result.bits_per_byte, "seconds": result.seconds,
           "documents": result.documents, "dtype": args.dtype,
           "attn_implementation": args.attn_implementation, "threads": torch.get_num_threads(),
           "window": config.window, "stride": config.stride}
    if args.json:
        write_json_atomic(args.json, out)
    print(f"{args.model} on {args.corpus}/{args.split}: perplexity {result.perplexity:.3f}, "
          f"{result.bits_per_byte:.4f} bits/byte over {result.tokens:,} tokens "
          f"({result.seconds:.1f} s)")
    return 0


# ---------------------------------------------------------------------------------------------
# demo and report

def _demo(args) -> int:
    from pertoken.demo import DemoConfig, run_demo

    run_demo(DemoConfig(results_dir=Path(args.results_dir), report=Path(args.report),
                        max_tokens=args.max_tokens, model=args.model, threads=args.threads))
    return 0


def _report(args) -> int:
    from pertoken.report import build_report

    path = build_report(Path(args.results_dir), Path(args.output))
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pertoken import __version__
    from pertoken.models import DEFAULT_MODEL

    parser = _Parser(prog="pertoken", description="Make language models spend less per token.")
    parser.add_argument("--version", action="version", version=f"pertoken {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    models = commands.add_parser("models", help="the models pertoken knows")
    models_verbs = models.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    p = models_verbs.add_parser("list", help="aliases and what is cached")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_models_list)

    data = commands.add_parser("data", help="corpora")
    data_verbs = data.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    p = data_verbs.add_parser("list", help="named corpora with their sizes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_data_list)
    p = data_verbs.add_parser("build", help="build named corpora (installs Debian packages as root)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--force", action="store_true", help="rebuild even if built")
    p.set_defaults(func=_data_build)

    evaluate = commands.add_parser("eval", help="evaluate a model")
    eval_verbs = evaluate.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    p = eval_verbs.add_parser("ppl", help="perplexity and bits per byte on a corpus split")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, folder or .gguf (default {DEFAULT_MODEL})")
    p.add_argument("--corpus", default="wiki-en", help="corpus name, or a text/JSONL file, folder or glob")
    p.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens to score (0: all)")
    p.add_argument("--window", type=_positive_int, default=512, help="tokens per forward pass")
    p.add_argument("--stride", type=_positive_int, default=None, help="window advance (default window/2)")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--separator", default="eos", choices=["eos", "bos", "none"],
                   help="token put before each document")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    p.add_argument("--json", help="write the result as JSON here")
    p.set_defaults(func=_eval_ppl)

    from pertoken.superbpe.cli import add_commands as add_superbpe

    add_superbpe(commands, _Parser, _positive_int)
    from pertoken.speculative.cli import add_commands as add_speculative

    add_speculative(commands, _Parser, _positive_int)
    from pertoken.sae.cli import add_commands as add_sae

    add_sae(commands, _Parser, _positive_int)
    from pertoken.quant.cli import add_commands as add_quant

    add_quant(commands, _Parser, _positive_int)

    p = commands.add_parser("demo", help="run every method at a small setting and build the report")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--results-dir", default="docs/results")
    p.add_argument("--report", default="report/index.html")
    p.add_argument("--max-tokens", type=_positive_int, default=4096)
    p.add_argument("--threads", type=_positive_int, default=1)
    p.set_defaults(func=_demo)

    p = commands.add_parser("report", help="gather docs/results/*.json into one HTML page")
    p.add_argument("--results-dir", default="docs/results")
    p.add_argument("-o", "--output", default="report/index.html")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pertoken`` console script."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        if not args.verbose:
            # transformers imports torchao when it is installed (pertoken's benchmark baseline);
            # its CPU-only build warns about its CUDA extensions and torch about its enums
            for noisy in ("torchao", "torch.utils._pytree"):
                logging.getLogger(noisy).setLevel(logging.ERROR)
        return args.func(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
