"""``pertoken superbpe train`` and ``pertoken superbpe eval``."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from pertoken.errors import UserError

log = logging.getLogger(__name__)


def _train(args) -> int:
    from pertoken.atomic import atomic_path
    from pertoken.data import open_corpus
    from pertoken.superbpe.trainer import SuperBPEConfig, save_tokenizer, train_superbpe

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists: pass --overwrite to replace it")
    transition = args.vocab_size if args.bpe else args.transition
    specials = [s for s in (args.special_tokens or "").split(",") if s]
    config = SuperBPEConfig(vocab_size=args.vocab_size, transition=transition,
                            max_words=args.max_words, pretokenization=args.pretokenization,
                            special_tokens=specials, stage2_max_bytes=args.stage2_max_bytes)
    config.validate()
    corpora = [open_corpus(name, text_field=args.text_field) for name in args.corpus]

    def documents():
        return itertools.chain.from_iterable(c.documents(args.split) for c in corpora)

    tokenizer, info = train_superbpe(documents(), config, documents())
    info["corpora"] = args.corpus
    info["split"] = args.split
    with atomic_path(out) as tmp:
        save_tokenizer(tokenizer, info, tmp)
    stats = info["stats"]
    print(f"{out}: vocabulary {info['vocab_size']:,} ({stats['stage1_merges']:,} stage-1 and "
          f"{stats['stage2_merges']:,} stage-2 merges) from {stats['corpus_bytes']:,} bytes in "
          f"{stats['stage1_seconds'] + stats['stage2_encode_seconds'] + stats['stage2_train_seconds']:.1f} s")
    return 0


def _eval(args) -> int:
    from pertoken.atomic import write_json_atomic
    from pertoken.data import open_corpus, take_bytes
    from pertoken.superbpe.evaluate import load_any_tokenizer, score_tokenizers, scores_json

    tokenizers = [(spec, load_any_tokenizer(spec)) for spec in args.tokenizer]
    corpus = open_corpus(args.corpus, text_field=args.text_field)
    documents = list(take_bytes(corpus.documents(args.split), args.max_bytes))
    scores = score_tokenizers(tokenizers, documents)
    result = scores_json(args.corpus, args.split, documents, scores)
    if args.json:
        write_json_atomic(args.json, result)
    print(f"{args.corpus}/{args.split}: {result['bytes']:,} bytes")
    for s in scores:
        print(f"  {s.name}: {s.bytes_per_token:.3f} bytes/token, {s.relative_tokens:.3f}x tokens, "
              f"{s.superword_entries:,} superwords of {s.vocab_size:,}, {s.encode_mb_per_s:.1f} MB/s")
    return 0


def add_commands(commands, parser_class, positive_int) -> None:
    """Add ``superbpe train`` and ``superbpe eval`` to the top-level subparsers."""
    from pertoken.superbpe.pretokenizers import PRETOKENIZATIONS

    group = commands.add_parser("superbpe", help="SuperBPE superword tokenizers")
    verbs = group.add_subparsers(dest="verb", required=True, parser_class=parser_class)

    p = verbs.add_parser("train", help="train a SuperBPE (or BPE) tokenizer")
    p.add_argument("--corpus", action="append", required=True,
                   help="corpus name, or a text/JSONL file, folder or glob (repeatable)")
    p.add_argument("--split", default="train", choices=["train", "heldout", "all"])
    p.add_argument("--text-field", default="text")
    p.add_argument("--vocab-size", type=positive_int, default=65536,
                   help="256 byte symbols plus merges (default 65536)")
    p.add_argument("--transition", type=int, default=None,
                   help="stage-1 vocabulary size t (0: no pretokenization; default 0.9 x vocab)")
    p.add_argument("--bpe", action="store_true", help="plain BPE (transition = vocab size)")
    p.add_argument("--max-words", type=int, default=4, help="words per stage-2 token (0: no cap)")
    p.add_argument("--pretokenization", default="paper", choices=list(PRETOKENIZATIONS))
    p.add_argument("--special-tokens", default="", help="comma-separated, added after training")
    p.add_argument("--stage2-max-bytes", type=positive_int, default=None,
                   help="train stage 2 on at most this many bytes")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_train)

    p = verbs.add_parser("eval", help="compare tokenizers on a corpus split")
    p.add_argument("--tokenizer", action="append", required=True,
                   help="tokenizer.json, a folder, or a model alias (repeatable; the first is the reference)")
    p.add_argument("--corpus", default="wiki-en")
    p.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-bytes", type=positive_int, default=50_000_000)
    p.add_argument("--json", help="write the scores as JSON here")
    p.set_defaults(func=_eval)
