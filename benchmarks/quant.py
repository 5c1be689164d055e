"""Benchmark OutlierTune (pertoken.quant) on the default model against its baselines.

In one run, on SmolLM2-135M-Instruct:

- perplexity on held-out ``wiki-en`` and ``docs-en`` for fp32, bf16, torchao's
  ``Int8DynamicActivationInt8WeightConfig`` (the established per-token int8 baseline, decoder
  linears only, as ours) and every pertoken method at W8A8, W6A6 and W4A8 (weight-only at
  W8/W6/W4), each quantized model saved and evaluated after :func:`pertoken.quant.load`;
- 512-token prefill tokens per second (with the next-token logits only, as ``generate`` does,
  and with all 512 logits, as perplexity scoring does), decode ms per token, and weight bytes,
  for fp32, bf16, the int8 methods and torchao, at one fixed thread count;
- per-linear milliseconds on the model's shapes at M = 1, 128, 512 tokens.

Weights are rounded to nearest (``rtn_asym``) at 8 bits and by GPTQ below (plus an
OutlierTune W6A6 row with round-to-nearest, to show what the rounding is worth). Calibration:
train splits of wiki-en and of the documentation corpora (see ``CALIBRATION``); static scales
only cover what calibration showed them. Quantized folders and perplexities are kept in the work folder, so an
interrupted run resumes (``--fresh`` starts over).

Writes docs/results/quant.json and docs/results/quant.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pertoken.atomic import write_json_atomic
from pertoken.bench import CPU_FLAGS, environment, markdown_table, pin_threads, write_results
from pertoken.data import open_corpus
from pertoken.evaluate import PerplexityConfig, perplexity
from pertoken.models import DEFAULT_MODEL, cache_dir, load_model

log = logging.getLogger("bench.quant")

CALIBRATION = ("wiki-en:8192,linux-doc-en:2048,rust-doc-en:2048,python-doc-en:2048,"
               "handbook-en:2048")
"""half Wikipedia, half the documentation corpora that docs-en's held-out tokens come from"""


@dataclass(frozen=True)
class Run:
    method: str
    w_bits: int = 8
    a_bits: int = 8
    weights: str = "rtn_asym"
    shift: bool = True
    dynamic_alpha: float | None = 0.6
    head: bool = False

    @property
    def name(self) -> str:
        bits = f"w{self.w_bits}" if self.method == "weight-only" else \
            f"w{self.w_bits}a{self.a_bits}"
        extra = ""
        if self.method == "outliertune":
            extra = ("" if self.shift else "-noshift") + \
                ("" if self.dynamic_alpha is not None else "-nomigrate")
        return f"{self.method}{extra}{'-head' if self.head else ''}-{bits}-{self.weights}"


def _runs() -> list[Run]:
    runs = []
    for w, a in ((8, 8), (6, 6), (4, 8)):
        weights = "rtn_asym" if w == 8 else "gptq"
        runs += [Run("outliertune", w, a, weights), Run("per-token", w, a, weights)]
        if w != 4:
            runs += [Run("smoothquant", w, a, weights), Run("weight-only", w, 16, weights),
                     Run("outliertune", w, a, weights, shift=False),
                     Run("outliertune", w, a, weights, dynamic_alpha=None)]
    # symmetric 8-bit weights skip the zero-point term (a row sum and a rank-one update per
    # linear), which is worth timing; the head option on top of them
    runs += [Run("per-tensor", 8, 8), Run("outliertune", 6, 6, "rtn_asym"),
             Run("outliertune", 8, 8, "rtn_sym"), Run("outliertune", 8, 8, "rtn_sym", head=True),
             Run("outliertune", 8, 8, "gptq_sym")]  # symmetric, with GPTQ's accuracy
    return runs


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, shared tensors once, tensor subclasses
    (torchao's) by their inner tensors."""
    def flat(t) -> int:
        if hasattr(t, "__tensor_flatten__"):
            return sum(flat(getattr(t, a)) for a in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += flat(t)
    return total


def packed_bytes(model: torch.nn.Module) -> int:
    """Bytes of the oneDNN prepacked int8 weights a quantized model built at run time (a second
    copy of its linear weights, next to the buffers that are saved)."""
    from pertoken.quant.qlinear import QuantLinear

    owners = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            owners[id(m)] = m
            if m.shared is not None:
                owners[id(m.shared)] = m.shared
    return sum(o._onednn.packed.numel() for o in owners.values()
               if getattr(o, "_onednn", None) is not None)


def torchao_model(dtype: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model, tok = load_model(DEFAULT_MODEL, dtype=dtype)
    quantize_(model, Int8DynamicActivationInt8WeightConfig(),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    return model, tok


def quantized_folder(run: Run, work: Path, batches_fn) -> Path:
    from dataclasses import asdict

    from pertoken.quant.convert import QuantConfig, quantize_model
    from pertoken.quant.io import is_quantized_folder, save_quantized

    folder = work / run.name
    if is_quantized_folder(folder):
        return folder
    cfg = QuantConfig(method=run.method, w_bits=run.w_bits, a_bits=min(run.a_bits, 8),
                      weights=run.weights, shift=run.shift, head=run.head,
                      dynamic_alpha=run.dynamic_alpha)
    model, tok = load_model(DEFAULT_MODEL, dtype="float32")
    t0 = time.perf_counter()
    quantize_model(model, batches_fn(tok), cfg, progress=False)
    seconds = time.perf_counter() - t0
    save_quantized(model, tok, folder, {**asdict(cfg), "source_model": DEFAULT_MODEL,
                                        "convert_seconds": seconds},
                   embedding_dtype="bfloat16")
    log.info("quantized %s in %.0f s", run.name, seconds)
    return folder


def heldout_documents(corpus: str):
    """The held-out documents of ``corpus``. ``docs-en`` is the union of the English corpora
    with wiki-en first, so its leading tokens would repeat wiki-en: here it stands for its
    documentation members, taken in turn one document each."""
    if corpus != "docs-en":
        yield from open_corpus(corpus).documents("heldout")
        return
    from pertoken.data import named_corpus

    members = [m for m in named_corpus("docs-en").members if m != "wiki-en"]
    streams = [open_corpus(m).documents("heldout") for m in members]
    while streams:
        for stream in list(streams):
            try:
                yield next(stream)
            except StopIteration:
                streams.remove(stream)


def cached_perplexity(key: Path, model_fn, corpus: str, max_tokens: int) -> dict:
    if key.is_file():
        return json.loads(key.read_text())
    model, tok = model_fn()
    result = perplexity(model, tok, heldout_documents(corpus),
                        PerplexityConfig(max_tokens=max_tokens), progress=False)
    out = {"perplexity": result.perplexity, "tokens": result.tokens,
           "seconds": result.seconds}
    write_json_atomic(key, out)
    return out


def _median_ms(fn, repeats: int, warmup: int = 1) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _prefill_ms(model, prompt: torch.Tensor) -> float:
    """ms of one prefill of ``prompt`` (1, T) with next-token logits."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=prompt, logits_to_keep=1)
        return 1000 * (time.perf_counter() - t0)


def timings(model, prompt: torch.Tensor, decode_steps: int) -> dict:
    """One round: prefill ms for ``prompt`` (1, T) with next-token logits and with all logits,
    and the median ms of a one-token decode step after a 128-token prompt."""
    last = _prefill_ms(model, prompt)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=prompt)
        full = time.perf_counter() - t0
        out = model(input_ids=prompt[:, :128], use_cache=True, logits_to_keep=1)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(decode_steps):
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - t0)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return {"prefill_ms": last, "prefill_all_logits_ms": 1000 * full,
            "decode_ms_per_token": 1000 * statistics.median(steps)}


def interleaved_speed(subjects: list[dict], prompt: torch.Tensor, repeats: int,
                      decode_steps: int) -> None:
    """Time every subject once per round, the rounds interleaving the subjects (so a slow
    spell of the machine hits them all alike); fill each subject's row with the medians over
    rounds, and its speed ratios to fp32 and bf16 as the median of the per-round ratios.
    The prefill ratio to fp32 pairs each prefill with an fp32 prefill timed right beside it
    (first or second in turn), since this machine's speed drifts within a round."""
    from pertoken.quant.kernels import use_compiled_kernels
    from pertoken.quant.qlinear import use_gemm

    fp32 = next(sub for sub in subjects if sub["row"]["name"] == "fp32")["model"]
    rounds = []
    for r in range(repeats + 1):  # round 0 warms up (and packs and compiles)
        times = {}
        for sub in subjects:
            use_compiled_kernels(sub["row"]["compiled_kernels"])
            use_gemm(sub["row"]["gemm"] or "onednn")
            try:
                row = times[sub["row"]["name"]] = timings(sub["model"], prompt, decode_steps)
                row["paired_vs_fp32"] = 1.0
                if sub["model"] is not fp32:
                    if r % 2:
                        base, own = _prefill_ms(fp32, prompt), _prefill_ms(sub["model"], prompt)
                    else:
                        own, base = _prefill_ms(sub["model"], prompt), _prefill_ms(fp32, prompt)
                    row["paired_vs_fp32"] = base / own
            finally:
                use_compiled_kernels(False)
                use_gemm("onednn")
        if r:
            rounds.append(times)
        log.info("speed round %d/%d: %s", r, repeats,
                 {k: round(v["prefill_ms"]) for k, v in times.items()})
    tokens = prompt.shape[1]
    for sub in subjects:
        row, name = sub["row"], sub["row"]["name"]
        for key in ("prefill_ms", "prefill_all_logits_ms", "decode_ms_per_token"):
            row[key] = statistics.median(t[name][key] for t in rounds)
        row["prefill_tok_s"] = tokens / row["prefill_ms"] * 1000
        row["prefill_all_logits_tok_s"] = tokens / row["prefill_all_logits_ms"] * 1000
        row["prefill_vs_fp32"] = statistics.median(t[name]["paired_vs_fp32"] for t in rounds)
        row["prefill_vs_bf16"] = statistics.median(
            t["bf16"]["prefill_ms"] / t[name]["prefill_ms"] for t in rounds)
        for base in ("fp32", "bf16"):
            row[f"all_logits_vs_{base}"] = statistics.median(
                t[base]["prefill_all_logits_ms"] / t[name]["prefill_all_logits_ms"]
                for t in rounds)
        row["decode_vs_fp32"] = statistics.median(
            t["fp32"]["decode_ms_per_token"] / t[name]["decode_ms_per_token"] for t in rounds)


def kernel_rows(repeats: int) -> list[dict]:
    """Per-linear ms on SmolLM2's shapes (spec §2's table): float32 input for every integer
    path (float32 rest), bfloat16 for the bfloat16 linear."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from pertoken.quant.kernels import use_compiled_kernels
    from pertoken.quant.qlinear import QuantLinear, use_gemm
    from pertoken.quant.quantizers import quantize_weight

    rows = []
    g = torch.Generator().manual_seed(0)
    for k, n in ((576, 576), (576, 1536), (1536, 576), (576, 49152)):
        linear = torch.nn.Linear(k, n, bias=False)
        half = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
        half.weight.data = linear.weight.data.bfloat16()
        static = QuantLinear(quantize_weight(linear.weight, 8, "rtn_asym"), None, "static", 8,
                             inv_scale=torch.full((k,), 40.0))
        static_sym = QuantLinear(quantize_weight(linear.weight, 8, "rtn_sym"), None, "static",
                                 8, inv_scale=torch.full((k,), 40.0))
        dynamic = QuantLinear(quantize_weight(linear.weight, 8, "rtn_sym"), None, "per-token", 8)
        ao = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
        ao[0].weight.data = linear.weight.data.clone()
        quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        for m in (1, 128, 512):
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16()
            rows.append({"k": k, "n": n, "m": m,
                         "fp32_ms": _median_ms(lambda: linear(x), repeats),
                         "bf16_ms": _median_ms(lambda: half(xb), repeats),
                         "outliertune_static_ms": _median_ms(lambda: static(x), repeats),
                         "per_token_ms": _median_ms(lambda: dynamic(x), repeats),
                         "outliertune_static_sym_ms": _median_ms(lambda: static_sym(x), repeats),
                         "torchao_da8w8_ms": _median_ms(lambda: ao(x), repeats)})
            use_gemm("int_mm")
            rows[-1]["outliertune_static_int_mm_ms"] = _median_ms(lambda: static(x), repeats)
            rows[-1]["per_token_int_mm_ms"] = _median_ms(lambda: dynamic(x), repeats)
            use_gemm("onednn")
            if use_compiled_kernels(True):
                rows[-1]["outliertune_static_compiled_ms"] = _median_ms(lambda: static(x),
                                                                        repeats)
                rows[-1]["per_token_compiled_ms"] = _median_ms(lambda: dynamic(x), repeats)
            use_compiled_kernels(False)
    return rows


def perplexity_rows(subjects: list[tuple], work: Path, corpora: list[str],
                    max_tokens: int) -> list[dict]:
    """A perplexity row per ``(name, run, model_fn)`` subject on ``max_tokens`` held-out
    tokens of each corpus (cached in ``work``), with its ratios to the first subject's."""
    from pertoken.quant.kernels import use_compiled_kernels

    rows = []
    for name, run, model_fn in subjects:
        row = {"name": name}
        compiled = name.endswith("(compiled kernels)")
        if compiled:
            row["compiled_kernels"] = use_compiled_kernels(True)
        if run is not None:
            row.update(method=run.method, w_bits=run.w_bits,
                       a_bits=run.a_bits if run.method != "weight-only" else 16,
                       weights=run.weights, shift=run.shift if run.method == "outliertune"
                       else "", dynamic_alpha=run.dynamic_alpha
                       if run.method == "outliertune" else "", head=run.head,
                       file_mb=(work / run.name / "model.safetensors").stat().st_size / 1e6)
        else:
            row.update(method=name, w_bits={"fp32": 32, "bf16": 16}.get(name, 8),
                       a_bits={"fp32": 32, "bf16": 16}.get(name, 8))
        for corpus in corpora:
            tag = run.name + "-compiled" if compiled else name
            got = cached_perplexity(work / "ppl" / f"{tag}-{corpus}-{max_tokens}.json",
                                    model_fn, corpus, max_tokens)
            row[f"ppl_{corpus}"] = got["perplexity"]
            row[f"tokens_{corpus}"] = got["tokens"]
        use_compiled_kernels(False)
        log.info("%s: %s", name, {k: v for k, v in row.items() if k.startswith("ppl")})
        rows.append(row)
    fp = rows[0]
    for row in rows:
        for corpus in corpora:
            row[f"vs_fp32_{corpus}"] = row[f"ppl_{corpus}"] / fp[f"ppl_{corpus}"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", default=CALIBRATION,
                        help="calibration and GPTQ data, CORPUS:TOKENS,... (train splits, 512 "
                        "tokens per sequence)")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="scored held-out tokens per corpus")
    parser.add_argument("--confirm-tokens", type=int, default=16384,
                        help="score fp32 and the timed W8A8 OutlierTune models (eager and on "
                        "the compiled kernels) once more on this many tokens (0: not)")
    parser.add_argument("--corpora", default="wiki-en,docs-en")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for timing")
    parser.add_argument("--eval-threads", type=int, default=2,
                        help="torch threads for calibration and perplexity (not timed)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rest-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="float type of what a quantized model keeps in float, for timing "
                        "(bfloat16 only pays on CPUs with bf16 instructions)")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--skip", default="", help="comma list: ppl, speed, kernels")
    parser.add_argument("--only", default="", help="comma list of run names (default: all)")
    parser.add_argument("--convert-only", action="store_true",
                        help="quantize the selected runs into the work folder and stop (to "
                        "spread the conversions over processes before one full run)")
    parser.add_argument("--work-dir", default=None,
                        help="quantized folders and perplexities (default: per calibration, "
                        "under the pertoken cache)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--results-dir", default="docs/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    skip = set(filter(None, args.skip.split(",")))
    import hashlib

    tag = hashlib.sha1(args.calib.encode()).hexdigest()[:8]
    work = Path(args.work_dir or cache_dir() / "bench" / "quant" / f"calib-{tag}")
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    corpora = [c for c in args.corpora.split(",") if c]

    from pertoken.quant.cli import mixed_calibration_batches, parse_calibration
    from pertoken.quant.io import load

    def batches_fn(tok):
        return mixed_calibration_batches(tok, parse_calibration(args.calib), 512)

    runs = _runs()
    if args.only:
        runs = [r for r in runs if r.name in args.only.split(",")]
    if args.convert_only:
        pin_threads(args.eval_threads)
        for run in runs:
            quantized_folder(run, work, batches_fn)
        return
    rows, confirm_rows = [], []
    if "ppl" not in skip:
        pin_threads(args.eval_threads)
        subjects = [("fp32", None, lambda: load_model(DEFAULT_MODEL, dtype="float32")),
                    ("bf16", None, lambda: load_model(DEFAULT_MODEL, dtype="bfloat16")),
                    ("torchao-da8w8", None, lambda: torchao_model("float32"))]
        for run in runs:
            folder = quantized_folder(run, work, batches_fn)
            subjects.append((run.name, run, lambda folder=folder: load(folder)))
        # The timed W8A8 models once more on the compiled kernels (the timed prefill path):
        # these can round a value at a tie the other way, and the network amplifies a flip.
        timed_w8a8 = ("outliertune-w8a8-rtn_asym", "outliertune-w8a8-gptq_sym")
        subjects += [(f"{name} (compiled kernels)", run, model_fn)
                     for name, run, model_fn in list(subjects) if name in timed_w8a8]
        rows = perplexity_rows(subjects, work, corpora, args.max_tokens)
        if args.confirm_tokens:
            # The 1% criterion on the timed W8A8 models once more, on more tokens: a single
            # rounding flip moves a 4096-token perplexity by a few tenths of a percent.
            confirm = [s for s in subjects if s[0] == "fp32" or s[0].startswith(timed_w8a8)]
            confirm_rows = perplexity_rows(confirm, work, corpora, args.confirm_tokens)

    speed_rows = []
    if "speed" not in skip:
        pin_threads(args.threads)
        _, tok = load_model(DEFAULT_MODEL, dtype="float32")
        stream = []
        for doc in open_corpus("wiki-en").documents("heldout"):
            stream += tok(doc)["input_ids"] + [tok.eos_token_id]
            if len(stream) >= 512:
                break
        prompt = torch.tensor([stream[:512]])
        rest = args.rest_dtype
        from pertoken.quant.kernels import use_compiled_kernels
        from pertoken.quant.qlinear import QuantLinear, onednn_available

        timed = [r for r in runs if r.w_bits == 8 and r.shift and r.dynamic_alpha is not None
                 and r.method in ("outliertune", "smoothquant", "per-token")]
        subjects = [("fp32", lambda: load_model(DEFAULT_MODEL, dtype="float32")[0]),
                    ("bf16", lambda: load_model(DEFAULT_MODEL, dtype="bfloat16")[0]),
                    (f"torchao-da8w8 ({rest} rest)", lambda: torchao_model(rest)[0])]
        for run in timed:
            folder = quantized_folder(run, work, batches_fn)
            subjects.append((f"{run.name} ({rest} rest)",
                             lambda folder=folder: load(folder, dtype=rest)[0]))
            if run.method == "outliertune" or run.name.startswith("per-token"):
                subjects.append((f"{run.name} ({rest} rest, compiled kernels)",
                                 lambda folder=folder: load(folder, dtype=rest)[0]))
            if run == Run("outliertune"):  # the previous GEMM path, as an ablation
                subjects.append((f"{run.name} ({rest} rest, int_mm)",
                                 lambda folder=folder: load(folder, dtype=rest)[0]))
        loaded = []
        for name, model_fn in subjects:
            model = model_fn()
            int_mm = name.endswith("int_mm)")
            quantized = any(isinstance(m, QuantLinear) for m in model.modules())
            loaded.append({"model": model, "row": {
                "name": name, "threads": torch.get_num_threads(),
                "compiled_kernels": "compiled kernels" in name and use_compiled_kernels(True),
                # the integer GEMM behind the QuantLinears; none for fp32, bf16 and torchao
                "gemm": (None if not quantized
                         else "int_mm" if int_mm or not onednn_available() else "onednn"),
                "weight_mb": tensor_bytes(model) / 1e6}})
            use_compiled_kernels(False)
        interleaved_speed(loaded, prompt, args.repeats, args.decode_steps)
        for sub in loaded:
            row = sub["row"]
            row["packed_mb"] = packed_bytes(sub["model"]) / 1e6
            row["weight_vs_fp32"] = row["weight_mb"] / loaded[0]["row"]["weight_mb"]
            log.info("%s: %s", row["name"], row)
            speed_rows.append(row)
        del loaded

    kernels = [] if "kernels" in skip else kernel_rows(max(args.repeats, 25))

    result = {"method": "quant", "title": f"OutlierTune and baselines on {DEFAULT_MODEL}",
              "description": (
                  f"Perplexity on {args.max_tokens} held-out tokens per corpus (window 512, "
                  f"stride 256; docs-en: its documentation members, one document from each "
                  f"in turn) after save and load; calibration on {args.calib} (train splits, "
                  f"512 tokens per sequence); weights rtn_asym at 8 bits, GPTQ "
                  f"below; the embedding stored in bf16. Speed at {args.threads} thread(s), "
                  f"one 512-token wiki-en prompt, all models loaded and timed in turn in each "
                  f"of {args.repeats} rounds (after a warm-up round): medians over rounds, "
                  f"speed ratios the median of each round's ratio (prefill vs fp32: of a "
                  f"prefill and an fp32 prefill timed side by side, in turn first and "
                  f"second); quantized models keep the "
                  f"rest in {args.rest_dtype}; packed_mb is the prepacked copy of the int8 "
                  f"weights that oneDNN runs on, held next to the saved buffers."),
              "environment": environment(), "perplexity": rows,
              "perplexity_confirm": confirm_rows, "speed": speed_rows, "kernels": kernels}
    if rows:
        result["summary"] = summary(rows, speed_rows, corpora, confirm_rows)
        result["plots"] = [plot(rows, corpus) for corpus in corpora]
    columns = ["name", "w_bits", "a_bits", "weights"] + \
        [c for corpus in corpora for c in (f"ppl_{corpus}", f"vs_fp32_{corpus}")]
    env = result["environment"]
    md = [f"# {result['title']}\n", result["description"] + "\n",
          f"Machine: {env.get('cpu_model') or '?'}, {env['cpus']} cores; instruction sets "
          f"{', '.join(env['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}; "
          f"torch {env['torch']}.\n"]
    if rows:
        md += ["## Perplexity\n", markdown_table(rows, columns),
               *([f"## W8A8 perplexity on {args.confirm_tokens} tokens per corpus\n",
                  markdown_table(confirm_rows, columns)] if confirm_rows else []),
               "## Summary\n", markdown_table([{"item": k, "value": v}
                                               for k, v in result["summary"].items()],
                                              ["item", "value"])]
    if speed_rows:
        md += ["## Speed and size\n", markdown_table(speed_rows, [
            "name", "threads", "gemm", "prefill_tok_s", "prefill_vs_fp32", "prefill_vs_bf16",
            "prefill_all_logits_tok_s", "all_logits_vs_fp32", "all_logits_vs_bf16",
            "decode_ms_per_token", "decode_vs_fp32", "weight_mb", "weight_vs_fp32", "packed_mb"])]
    if kernels:
        md += ["## Per-linear ms\n", markdown_table(kernels, list(kernels[0]))]
    write_results(Path(args.results_dir), "quant", result, "\n".join(md))
    print("\n".join(md))


def summary(rows: list[dict], speed_rows: list[dict], corpora: list[str],
            confirm_rows: list[dict] = ()) -> dict:
    """The headline ratios; those of ``confirm_rows`` keyed with their token count too."""
    by = {r["name"]: r for r in rows}
    confirm = {r["name"]: r for r in confirm_rows}
    out = {}
    for corpus in corpora:
        key = f"vs_fp32_{corpus}"
        for label, name in (("ot_w8a8", "outliertune-w8a8-rtn_asym"),
                            ("ot_w8a8_sym", "outliertune-w8a8-rtn_sym"),
                            ("ot_w8a8_gptq_sym", "outliertune-w8a8-gptq_sym"),
                            ("ot_w8a8_compiled", "outliertune-w8a8-rtn_asym (compiled kernels)"),
                            ("ot_w8a8_gptq_sym_compiled",
                             "outliertune-w8a8-gptq_sym (compiled kernels)"),
                            ("ot_head_w8a8_sym", "outliertune-head-w8a8-rtn_sym"),
                            ("ot_w6a6", "outliertune-w6a6-gptq"),
                            ("ot_w6a6_rtn", "outliertune-w6a6-rtn_asym"),
                            ("per_token_w6a6", "per-token-w6a6-gptq"),
                            ("smoothquant_w8a8", "smoothquant-w8a8-rtn_asym"),
                            ("smoothquant_w6a6", "smoothquant-w6a6-gptq"),
                            ("ot_noshift_w8a8", "outliertune-noshift-w8a8-rtn_asym"),
                            ("ot_noshift_w6a6", "outliertune-noshift-w6a6-gptq"),
                            ("ot_nomigrate_w8a8", "outliertune-nomigrate-w8a8-rtn_asym"),
                            ("ot_nomigrate_w6a6", "outliertune-nomigrate-w6a6-gptq"),
                            ("per_token_w8a8", "per-token-w8a8-rtn_asym"),
                            ("torchao_w8a8", "torchao-da8w8")):
            if name in by:
                out[f"{label}_ppl_vs_fp32_{corpus}"] = by[name][key]
            if name in confirm:
                tokens = confirm[name][f"tokens_{corpus}"]
                out[f"{label}_ppl_vs_fp32_{corpus}_{tokens}"] = confirm[name][key]
    for row in speed_rows:
        if row["name"].startswith("outliertune"):
            tag = ("ot_head" if "-head-" in row["name"] else "ot") + \
                ("_sym" if "rtn_sym" in row["name"] else "") + \
                ("_gptq_sym" if "gptq_sym" in row["name"] else "") + \
                ("_compiled" if row.get("compiled_kernels") else "") + \
                ("_int_mm" if row.get("gemm") == "int_mm" else "")
            out[f"{tag}_prefill_vs_fp32"] = row["prefill_vs_fp32"]
            out[f"{tag}_prefill_vs_bf16"] = row["prefill_vs_bf16"]
            out[f"{tag}_all_logits_vs_fp32"] = row["all_logits_vs_fp32"]
            out[f"{tag}_all_logits_vs_bf16"] = row["all_logits_vs_bf16"]
            out[f"{tag}_weight_vs_fp32"] = row["weight_vs_fp32"]
    fp32 = next((row for row in speed_rows if row["name"] == "fp32"), None)
    for label, name in (("ot_w8a8", "outliertune-w8a8-rtn_asym"),
                        ("ot_w8a8_gptq_sym", "outliertune-w8a8-gptq_sym"),
                        ("ot_head_w8a8_sym", "outliertune-head-w8a8-rtn_sym")):
        if fp32 is not None and by.get(name, {}).get("file_mb"):  # the saved weights
            out[f"{label}_saved_weight_vs_fp32"] = by[name]["file_mb"] / fp32["weight_mb"]
    return out


def plot(rows: list[dict], corpus: str) -> dict:
    """Perplexity against weight bits, one line per method (activations as in the run)."""
    series = {}
    for row in rows:
        if row.get("weights") in ("gptq", "rtn_asym") and not row.get("head") \
                and not row.get("compiled_kernels") \
                and "noshift" not in row["name"] and "nomigrate" not in row["name"] \
                and row["w_bits"] <= 8 and row["method"] != "per-tensor":
            if row["w_bits"] < 8 and row["weights"] != "gptq":
                continue
            s = series.setdefault(row["method"], {"x": [], "y": []})
            s["x"].append(row["w_bits"])
            s["y"].append(row[f"ppl_{corpus}"])
    fp = next(r for r in rows if r["name"] == "fp32")[f"ppl_{corpus}"]
    series["fp32"] = {"x": [4, 8], "y": [fp, fp]}
    return {"title": f"Perplexity against weight bits ({corpus} held-out)", "kind": "line",
            "series": series, "xlabel": "weight bits (A8 at 8 and 4, A6 at 6)",
            "ylabel": "perplexity", "logy": True}


if __name__ == "__main__":
    main()
