"""Benchmark speculative decoding on the default target with the trained drafts (issue #4).

Cells: held-out wiki-en prompts and chat prompts, in float32 and bfloat16. Each cell is one
``pertoken speculative bench`` process (``--threads``, 2 by default: the machine's two cores)
that runs every method on the same prompts, interleaved (each prompt through every method in
turn, repeats outermost), and reports medians; ``--threads 1 --jobs 2`` runs two cells at once,
one per core (each cell compares methods only within itself; on this CPU a tree pass then costs
more against a decode step, so speed-ups come out lower: wiki-en, greedy DySpec with
``--budget auto``, 1.38x ``ar`` at one thread beside another cell, 1.47x at two threads
alone). Our methods draft with an EAGLE head (``--draft``); transformers' assisted generation,
which needs a standalone model, drafts with the distilled 2-layer draft
(``--assistant``). Without them, the ones kept in benchmarks/data (``KEPT``) are used, or
where none are kept, both are trained first with ``pertoken speculative train-draft``
(resumable stages, see ``ensure_draft`` and ``ensure_eagle``); ``--keep-drafts`` keeps them.

Writes docs/results/speculative.json and .md (tables, and plots of tokens per target call
against the budget). Finished cells are kept under $PERTOKEN_CACHE/bench/speculative and reused
on a rerun unless --fresh.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pertoken.bench import environment, markdown_table, write_results
from pertoken.data import build_corpus
from pertoken.models import DEFAULT_MODEL, cache_dir


def _finished(folder: Path, info: str) -> bool:
    return (folder / info).is_file() and not (folder / ".train" / "checkpoint.pt").exists()


def _train(folder: Path, extra: list[str], device: str, teacher_dtype: str = "float32") -> None:
    """One ``train-draft`` run into ``folder`` (resumed if it was interrupted), unless done."""
    info = "pertoken-eagle.json" if "eagle" in extra else "pertoken-draft.json"
    if _finished(folder, info):
        return
    cmd = [sys.executable, "-m", "pertoken", "speculative", "train-draft", "-o", str(folder),
           "--teacher-dtype", teacher_dtype, "--device", device, *extra]
    state = folder / ".train"
    if state.is_dir() and any(p.name != "config.json" for p in state.iterdir()):
        cmd.append("--resume")  # any stage's saved work, as train-draft counts it
    subprocess.run(cmd, check=True)


def draft_teacher_dtype(device: str = "auto") -> str:
    """The assistant recipe's teacher dtype: bfloat16 on a GPU or on a CPU with bfloat16
    arithmetic (measured on a 2-core AMD EPYC with avx512_bf16, 8 x 256 tokens through
    SmolLM2-135M: 2.4-2.6 s against 4.2-4.6 s in float32), float32 elsewhere (emulated
    bfloat16 is the slower)."""
    from pertoken.models import bf16_packing_available, resolve_device

    if resolve_device(device).type != "cpu" or bf16_packing_available():
        return "bfloat16"
    return "float32"


def ensure_draft(folder: Path, target: str, device: str = "auto") -> None:
    """The draft recipe: distil on 3M tokens of docs-en, then fine-tune on 512 chats sampled
    from the target plus wiki-en and docs-en (700k tokens, lr 1e-3). Both stages resume. The
    teacher runs in :func:`draft_teacher_dtype`. The second stage starts from the first 512
    kept chats (:data:`SELF_CHATS`: what it samples itself with a bfloat16 teacher, the seed and
    batches being the same), which saves about 10 minutes on 2 cores. On one H200 (``--device
    cuda``) the two stages take 2 minutes; on 2 CPU cores with a float32 teacher, 3-4 hours."""
    if _finished(folder, "pertoken-draft.json"):
        return
    base = folder.parent / (folder.name + "-base")
    dtype = draft_teacher_dtype(device)
    _train(base, ["--target", target, "--corpus", "docs-en"], device, teacher_dtype=dtype)
    seed_self_chats(folder, count=512)
    _train(folder, ["--target", target, "--init", str(base), "--self-chat", "512",
                    "--corpus", "wiki-en,docs-en", "--train-tokens", "700000", "--lr", "1e-3"],
           device, teacher_dtype=dtype)


SELF_CHATS = Path(__file__).parent / "data" / "eagle-self-chat-3072.jsonl.gz"
"""The EAGLE recipe's first stage, done once and kept: the 3072 chats that ``train-draft
--self-chat 3072`` sampled from SmolLM2-135M-Instruct in bfloat16 (seed 0, 2026-12-01, a
2-core AMD EPYC with avx512_bf16; 3.3 MB of JSONL, 0.9 MB gzipped). A 2-core CPU takes 50-65
minutes to sample them again, which left a session too little time for the teacher pass and
training after them (checked: seeded, ``train-draft --resume`` goes straight to the teacher
pass)."""


def seed_self_chats(folder: Path, source: Path = SELF_CHATS, count: int | None = None) -> bool:
    """Start a ``train-draft --self-chat`` run in ``folder`` from the first ``count`` (default
    all) kept chats of ``source``, unless the run has begun or there are none. ``train-draft``
    then resumes after its self-chat stage (it reads the chats it finds and samples only what is
    missing). Returns whether it seeded."""
    import gzip
    from itertools import islice

    state = folder / ".train"
    if state.exists() or not source.is_file():
        return False
    state.mkdir(parents=True)
    with gzip.open(source, "rb") as src, open(state / "self-chat.jsonl.tmp", "wb") as dst:
        dst.writelines(islice(src, count))
    (state / "self-chat.jsonl.tmp").rename(state / "self-chat.jsonl")
    return True


def ensure_eagle(folder: Path, target: str, device: str = "auto") -> None:
    """The EAGLE recipe: 3072 chats sampled from the target (:data:`SELF_CHATS`) plus docs-en
    and wiki-en, 5M tokens through the bfloat16 teacher once (features of layers 2 and 14
    besides the last), 16M tokens of training (3.3 epochs, 1954 steps of 32 sequences). On 2
    CPU cores: about 50 minutes of chats, 40 of teacher pass and 77 of training; held-out top-1
    agreement 0.563 (0.523 one step deeper). (The previous recipe, final feature only, float32
    teacher and 40M tokens, took 7 minutes on one H200 and reached 0.596.)"""
    if not _finished(folder, "pertoken-eagle.json"):
        seed_self_chats(folder)
    _train(folder, ["--kind", "eagle", "--target", target, "--self-chat", "3072",
                    "--corpus", "docs-en,wiki-en", "--data-tokens", "5000000",
                    "--train-tokens", "16000000", "--batch-size", "32",
                    "--feature-layers", "2,14", "--checkpoint-every", "100"], device,
           teacher_dtype="bfloat16")


KEPT = Path(__file__).parent / "data"
"""Where trained drafts are kept (:func:`keep_draft`), in the folders of ``KEPT_NAMES``."""
KEPT_NAMES = {"draft": "eagle-smollm2", "assistant": "draft-smollm2"}
"""The kept drafts' folder names by option: ``eagle-smollm2`` (``--draft``, our methods' EAGLE
head) and ``draft-smollm2`` (``--assistant``, hf-assisted's distilled model). A run without
``--draft`` or ``--assistant`` uses the kept ones, so a fresh machine benchmarks at once instead
of spending 5-8 CPU hours on ``ensure_eagle`` and ``ensure_draft``."""


def keep_draft(folder: Path, dest: Path) -> Path:
    """Copy the finished draft in ``folder`` (an EAGLE head or a draft model) to ``dest``
    with its floating-point weights rounded to float16, halving what git keeps: 11 MB for the
    head, 14 MB for the draft model. The benchmark loads them back in its own dtype; its
    default ``--fp16-draft`` rounds the weights to float16 anyway. The training state
    (``.train``) is left behind. Written atomically: ``dest`` is whole or absent."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pertoken.atomic import atomic_path

    info = folder / ("pertoken-eagle.json" if (folder / "pertoken-eagle.json").is_file()
                     else "pertoken-draft.json")
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for item in folder.iterdir():
            if item.name.startswith(".") or not item.is_file():
                continue
            if item.suffix == ".safetensors":
                state = {k: v.half() if v.is_floating_point() else v
                         for k, v in load_file(str(item)).items()}
                save_file(state, str(tmp / item.name), metadata={"format": "pt"})
            else:
                shutil.copy2(item, tmp / item.name)
        stored = json.loads(info.read_text())
        stored["stored_dtype"] = "float16"
        (tmp / info.name).write_text(json.dumps(stored, indent=2) + "\n")
    return dest


def _cell_name(args, prompts: str, dtype: str) -> str:
    """The cell's file stem: its prompts and dtype, and the drafting options that change it."""
    name = f"cell-{prompts.replace(':', '-')}-{dtype}"
    if not args.fp16_draft:
        name += "-fp32draft"
    if args.draft_temperature is not None:
        name += f"-dt{args.draft_temperature:g}"
    return name


def _same_run(cell: dict, args) -> bool:
    """Whether a finished cell ran with ``args``' drafts, drafting options, threads, lengths
    and grid of methods, budgets and temperatures (a cell from before float16 drafts records
    no ``fp16_draft``: it drafted in float32)."""
    rows = cell.get("results", [])
    ran = {r["method"] for r in rows}
    budgets = {("auto" if r.get("auto_budget") else str(r["budget"])) for r in rows
               if r["budget"] is not None}
    return (cell.get("draft") == str(args.draft) and cell.get("assistant") == str(args.assistant)
            and cell.get("calibrate") == args.calibrate
            and cell.get("fp16_draft", False) == args.fp16_draft
            and cell.get("draft_temperature") == args.draft_temperature
            and cell.get("threads") == args.threads
            and cell.get("max_new_tokens") == args.max_new_tokens
            and cell.get("repeats") == args.repeats
            and ran == set(args.methods.split(","))
            and budgets == set(args.budgets.split(","))
            and {r["temperature"] for r in rows} == {float(t) for t in
                                                     args.temperatures.split(",")})


def run_cell(args, work: Path, prompts: str, dtype: str) -> dict:
    out = work / f"{_cell_name(args, prompts, dtype)}.json"
    if out.is_file() and not args.fresh:
        cell = json.loads(out.read_text())
        if _same_run(cell, args):
            return cell
    cmd = [sys.executable, "-m", "pertoken", "speculative", "bench", "--model", args.model,
           "--draft", str(args.draft), "--assistant", str(args.assistant),
           "--methods", args.methods, "--budgets", args.budgets,
           "--temperatures", args.temperatures, "--prompts", prompts,
           "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats),
           "--dtype", dtype, "--threads", str(args.threads), "--json", str(out)]
    if args.calibrate:
        cmd.append("--calibrate")
    cmd.append("--fp16-draft" if args.fp16_draft else "--no-fp16-draft")
    if args.draft_temperature is not None:
        cmd += ["--draft-temperature", str(args.draft_temperature)]
    log = work / f"{_cell_name(args, prompts, dtype)}.log"
    with open(log, "w") as handle:
        subprocess.run(cmd, check=True, stdout=handle, stderr=subprocess.STDOUT)
    print(f"done: {prompts} {dtype}", flush=True)
    return json.loads(out.read_text())


def summarize(cell: dict) -> dict:
    rows = cell["results"]
    out = {"prompts": cell["prompts"], "dtype": cell["dtype"]}
    for t in sorted({r["temperature"] for r in rows}):
        at = [r for r in rows if r["temperature"] == t]
        # the best budget of each method by its paired speed-up over ar in the same repeats
        best = {m: max((r for r in at if r["method"] == m),
                       key=lambda r: r["speedup_vs_ar"] or r["tokens_per_second"], default=None)
                for m in ("dyspec", "dyspec-heap", "chain", "tree", "hf-assisted", "hf-ar")}
        tag = f"T{t:g}"
        for m in ("dyspec", "dyspec-heap"):
            if not best[m]:
                continue
            d = best[m]
            out[f"{tag}_{m}_budget"] = d["budget"]
            out[f"{tag}_{m}_speedup_vs_ar"] = d["speedup_vs_ar"]
            out[f"{tag}_{m}_tokens_per_call"] = d["tokens_per_call"]
            if best["hf-assisted"]:
                out[f"{tag}_{m}_vs_hf_assisted"] = (d["speedup_vs_ar"]
                                                    / best["hf-assisted"]["speedup_vs_ar"])
            for other in ("chain", "tree"):  # the smallest margin over the budgets run
                margins = [r["tokens_per_call"] - same["tokens_per_call"]
                           for r in at if r["method"] == m and not r.get("auto_budget")
                           for same in at if same["method"] == other
                           and same["budget"] == r["budget"] and not same.get("auto_budget")]
                if margins:
                    out[f"{tag}_{m}_minus_{other}_tokens_per_call_min"] = min(margins)
        if best["hf-ar"]:
            out[f"{tag}_hf_ar_vs_ar"] = best["hf-ar"]["speedup_vs_ar"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--draft", type=Path, default=None,
                        help="draft for our methods, an EAGLE head or a model folder "
                             "(default: train an EAGLE head under the bench cache)")
    parser.add_argument("--assistant", type=Path, default=None,
                        help="standalone draft model for hf-assisted (default: train one)")
    parser.add_argument("--prompt-sets", default="wiki-en:6,chat:6")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--methods", default="ar,hf-ar,chain,tree,dyspec,dyspec-heap,hf-assisted")
    parser.add_argument("--calibrate", action="store_true",
                        help="DySpec values from the online acceptance calibration")
    parser.add_argument("--fp16-draft", action=argparse.BooleanOptionalAction, default=True,
                        help="drafts (ours and hf-assisted's) on float16 weights")
    parser.add_argument("--draft-temperature", type=float, default=None,
                        help="the drafts' temperature (default: bench's)")
    parser.add_argument("--budgets", default="4,8,16,auto")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per cell")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once")
    parser.add_argument("--fresh", action="store_true", help="rerun finished cells")
    parser.add_argument("--train-device", default="auto",
                        help="where missing drafts train (train-draft --device): auto, cpu, cuda")
    parser.add_argument("--train-drafts", action="store_true",
                        help="train missing drafts under the bench cache even where "
                             "benchmarks/data keeps trained ones")
    parser.add_argument("--keep-drafts", action="store_true",
                        help="copy the finished drafts (--draft and --assistant, or the bench "
                             "cache's) to benchmarks/data in float16, then exit")
    parser.add_argument("--results-dir", default="docs/results")
    args = parser.parse_args()
    work = cache_dir() / "bench" / "speculative"
    work.mkdir(parents=True, exist_ok=True)
    if args.keep_drafts:  # the named drafts, or the bench cache's finished ones
        for name, kept in KEPT_NAMES.items():
            folder = getattr(args, name) or work / kept
            if any(_finished(folder, n) for n in ("pertoken-eagle.json", "pertoken-draft.json")):
                print(f"kept {keep_draft(folder, KEPT / kept)}", flush=True)
            else:
                print(f"{folder}: no finished draft to keep", flush=True)
        return
    for name, kept in KEPT_NAMES.items():
        if getattr(args, name) is None and (KEPT / kept).is_dir() and not args.train_drafts:
            setattr(args, name, KEPT / kept)
    if args.assistant is None or args.draft is None:
        # the drafts train on docs-en, whose Debian packages a fresh machine lacks
        build_corpus("docs-en", install=True)
    if args.assistant is None:
        args.assistant = work / KEPT_NAMES["assistant"]
        ensure_draft(args.assistant, args.model, args.train_device)
    if args.draft is None:
        args.draft = work / KEPT_NAMES["draft"]
        ensure_eagle(args.draft, args.model, args.train_device)
    info_files = {"draft": ("pertoken-eagle.json", "pertoken-draft.json"),
                  "assistant": ("pertoken-draft.json",)}
    infos = {}
    for name, names in info_files.items():
        folder = getattr(args, name)
        found = next((folder / n for n in names if (folder / n).is_file()), None)
        if found is None:
            print(f"error: --{name} {folder} is not a draft folder trained by pertoken",
                  file=sys.stderr)
            sys.exit(2)
        if not _finished(folder, found.name):  # a checkpoint's head folder, mid-training
            print(f"error: --{name} {folder} is still training (resume its train-draft run)",
                  file=sys.stderr)
            sys.exit(2)
        infos[name] = json.loads(found.read_text())
    draft_info = infos["draft"]

    cells = [(p, d) for d in args.dtypes.split(",") for p in args.prompt_sets.split(",")]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda c: run_cell(args, work, *c), cells))

    table_rows, plots = [], []
    for cell in results:
        for r in cell["results"]:
            table_rows.append({"prompts": cell["prompts"], "dtype": cell["dtype"], **{
                k: r[k] for k in ("method", "budget", "temperature", "tokens_per_call",
                                  "tokens_per_second", "speedup_vs_ar")},
                "auto": r.get("auto_budget", False),
                "mean_tree_size": r.get("mean_tree_size"),
                "same_as_ar": r.get("same_output_as_ar")})
        for t in sorted({r["temperature"] for r in cell["results"]}):
            series = {}
            for m in ("chain", "tree", "dyspec", "dyspec-heap", "hf-assisted"):
                points = {}  # budget -> tokens per call; a fixed budget's row over auto's
                for r in sorted((r for r in cell["results"] if r["method"] == m
                                 and r["temperature"] == t and isinstance(r["budget"], int)),
                                key=lambda r: not r.get("auto_budget")):
                    points[r["budget"]] = r["tokens_per_call"]
                if points:
                    series[m] = {"x": sorted(points), "y": [points[b] for b in sorted(points)]}
            measured = (cell.get("measured_tokens_per_call") or {}).get(str(float(t)))
            if measured:  # sampled DySpec at every budget, on the calibration prompts
                series["dyspec (calibration prompts)"] = {
                    "x": [m["budget"] for m in measured],
                    "y": [m["tokens_per_call"] for m in measured]}
            plots.append({"title": f"Tokens per target call, {cell['prompts']} prompts, "
                                   f"{cell['dtype']}, T={t:g}",
                          "series": series,
                          "xlabel": "budget (drafted tokens; auto's chosen budget, greedy "
                                    "DySpec's cap)",
                          "ylabel": "tokens per target call"})
    summary = [summarize(c) for c in results]
    result = {"method": "speculative",
              "title": "DySpec against plain decoding, chain, static tree and HF assisted",
              "model": args.model, "draft": str(args.draft), "assistant": str(args.assistant),
              "draft_kind": "eagle" if "vocab_coverage_heldout" in draft_info else "model",
              "assistant_cost": infos["assistant"].get("cost"), "threads": args.threads,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
              "calibrate": args.calibrate, "fp16_draft": args.fp16_draft,
              "draft_temperature": args.draft_temperature,
              "draft_cost": draft_info.get("cost"),
              "draft_training": draft_info.get("history", [])[-1:],
              "environment": environment(), "summary": summary, "results": table_rows,
              "acceptance": {f"{c['prompts']} {c['dtype']}": c["acceptance"] for c in results},
              "auto_budget": {f"{c['prompts']} {c['dtype']}": c["auto_budget"] for c in results},
              "plots": plots}
    columns = ["prompts", "dtype", "method", "budget", "temperature", "tokens_per_call",
               "tokens_per_second", "speedup_vs_ar", "auto", "mean_tree_size", "same_as_ar"]
    markdown = (f"# Speculative decoding: {args.model}\n\n"
                f"Our methods draft with `{args.draft.name}` ({result['draft_kind']}); "
                f"hf-assisted with `{args.assistant.name}`"
                + ("; DySpec's values use the online acceptance calibration" if args.calibrate
                   else "") + ".\n\n"
                f"{args.threads} torch thread(s) per cell; per cell (prompts, dtype): new tokens "
                f"per prompt and repeats (the median is quoted): "
                + ", ".join(f"{c['prompts']} {c['dtype']}: {c['max_new_tokens']} x{c['repeats']}"
                            for c in results) + ".\n\n## Summary\n\n"
                + markdown_table(summary, list(summary[0].keys()) if summary else [])
                + "\n## All runs\n\n" + markdown_table(table_rows, columns))
    path = write_results(Path(args.results_dir), "speculative", result, markdown)
    print(markdown)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
