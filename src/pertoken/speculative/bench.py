"""Measure speculative decoding: prompts, acceptance by draft rank, the target's cost against
the number of tree tokens (cached per machine), the budget that maximises expected tokens per
second, and the side-by-side benchmark behind ``pertoken speculative bench``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pertoken.errors import UserError
from pertoken.models import PackedLinear
from pertoken.speculative.methods import BENCH_METHODS as METHOD_CHOICES

log = logging.getLogger(__name__)

CHAT_PROMPTS = (
    "Explain how a rainbow forms.",
    "Write a short poem about the sea.",
    "What are the main differences between a virus and a bacterium?",
    "Give me three tips for learning a new language.",
    "Summarize the causes of the First World War.",
    "How does a refrigerator keep food cold?",
    "Write a friendly email inviting a colleague to lunch.",
    "What is photosynthesis and why is it important?",
    "Describe the water cycle in simple terms.",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
    "Tell me a short story about a lost dog finding its way home.",
    "Why is the sky blue?",
    "What are some healthy breakfast ideas?",
    "Explain what a computer program is to a ten-year-old.",
    "List the planets of the solar system in order from the sun.",
    "How can I improve my sleep?",
    "What does a software engineer do?",
    "Describe the city of Paris in a few sentences.",
    "What are the benefits of regular exercise?",
    "Explain how vaccines work.",
    "Write a recipe for a simple vegetable soup.",
    "What is the capital of Japan, and what is it known for?",
    "Give me advice on preparing for a job interview.",
)
"""Built-in chat prompts (``--prompts chat:N``), written for this project."""


def load_prompts(spec: str, tokenizer, prompt_tokens: int = 128, split: str = "heldout",
                 skip: int = 0) -> list[list[int]]:
    """Prompts from ``CORPUS:N`` (the first ``prompt_tokens`` tokens of ``N`` documents with at
    least 16 tokens) or ``chat:N`` (built-in questions in the model's chat template)."""
    name, _, count = spec.rpartition(":")
    if not name or not count.isdigit() or int(count) < 1:
        raise UserError(f"--prompts wants CORPUS:N or chat:N, got {spec!r}")
    n = int(count)
    if name == "chat":
        if skip + n > len(CHAT_PROMPTS):
            raise UserError(f"there are {len(CHAT_PROMPTS)} chat prompts, asked for {skip + n}")
        out = []
        for text in CHAT_PROMPTS[skip:skip + n]:
            messages = [{"role": "user", "content": text}]
            if tokenizer.chat_template:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
            else:
                ids = tokenizer.encode(text, add_special_tokens=False)
            out.append(list(ids))
        return out
    from pertoken.data import open_corpus

    out = []
    seen = 0
    for doc in open_corpus(name).documents(split):
        ids = tokenizer.encode(doc, add_special_tokens=False)
        if len(ids) < 16:
            continue
        seen += 1
        if seen <= skip:
            continue
        out.append(ids[:prompt_tokens])
        if len(out) == n:
            return out
    raise UserError(f"{name}/{split} has only {len(out)} documents to use as prompts, asked for {n}")


def star_shape(width: int) -> list[int]:
    return [-1] + [0] * width


def measure_acceptance(target, draft, prompts: Sequence[Sequence[int]], temperature: float,
                       width: int = 8, max_new_tokens: int = 48, top_k: int = 0,
                       top_p: float = 1.0, eos_token_id=None, seed: int = 0,
                       draft_temperature: float | None = None) -> list[float]:
    """Sequoia's acceptance vector: ``p[r]`` is the probability that the ``r``-th draft token
    drawn without replacement at a node is the one accepted, measured with star trees of
    ``width`` children while decoding ``prompts``."""
    from pertoken.speculative.generate import generate

    ranks: Counter[int] = Counter()
    steps = 0
    for i, prompt in enumerate(prompts):
        out = generate(target, draft, list(prompt), method="tree", budget=width,
                       temperature=temperature, top_k=top_k, top_p=top_p,
                       max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                       tree_shape=star_shape(width), seed=seed + i,
                       draft_temperature=draft_temperature)
        for step in out.steps:
            steps += 1
            if step.path:
                ranks[step.path[0] - 1] += 1
    return [ranks[r] / max(steps, 1) for r in range(width)]


@torch.inference_mode()
def measure_tree_costs(model, sizes: Sequence[int], context: int = 256, repeats: int = 5) -> dict:
    """Median seconds of one tree pass of ``N`` tokens over a ``context``-token cache, per N."""
    from transformers import DynamicCache

    from pertoken.speculative.tree import tree_forward

    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, model.config.vocab_size, (1, context), generator=g)
    out = {}
    for n in sizes:
        tokens = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        parents = [-1] + [i // 2 for i in range(1, n)]  # a binary tree
        times = []
        for _ in range(repeats + 1):
            cache = DynamicCache(config=model.config)
            model(input_ids=prefix, cache=cache, use_cache=True)
            start = time.perf_counter()
            tree_forward(model, cache, tokens, parents)
            times.append(time.perf_counter() - start)
        out[int(n)] = statistics.median(times[1:])
    return out


def fp32_gemm(model) -> str | None:
    """The GEMM an fp32 model's packed linears run for a few rows (``"mkl"`` or ``"onednn"``,
    with ``"+one-row"`` where one-row calls take it too), ``None`` when it has none."""
    linear = next((m for m in model.modules() if isinstance(m, PackedLinear)
                   and m.weight.dtype == torch.float32), None)
    if linear is None or linear.fp32_kernel is None:
        return None
    return linear.fp32_kernel + ("+one-row" if linear.one_row_packed else "")


def _machine_key(name: str, model) -> str:
    """A key for what a measured cost depends on: the model, its dtype and layout, the thread
    count, torch, and the CPU by name and instruction sets (VMs of one name may differ, and
    AMX alone reshapes the curve: on a 2-core Sapphire Rapids VM a bf16 pass over 32 tokens
    costs 1.2x a 1-token pass, an fp32 one 1.9x)."""
    from pertoken.bench import cpu_model

    model_name, flags = cpu_model()
    cpu = f"{model_name or platform.processor()}|{','.join(flags)}"
    linear = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    # the layout: strides, and the class (a PackedLinear runs other kernels: which fp32 GEMM)
    layout = "" if linear is None else f"{linear.weight.stride()}{type(linear).__name__}"
    gemm = fp32_gemm(model)
    if gemm:
        layout += f"|{gemm}"
    from pertoken.speculative.fp16 import has_fp16_linears

    if has_fp16_linears(model):
        layout += "|fp16-linears"
    parts = [name, str(next(model.parameters()).dtype), str(torch.get_num_threads()),
             torch.__version__, cpu, layout]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


COST_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 24, 32, 48, 64)
"""Tree sizes whose pass is timed: every size up to 10, where a pass's cost is not linear in
its tokens (at two threads SmolLM2's pass over 5 tokens costs 3.5 ms more than over 4, over 3
as much as over 4), which interpolating from 2, 4 and 8 missed."""

AUTO_MAX_BUDGET = 16
"""Greedy DySpec with ``--budget auto`` sizes each tree
(:class:`~pertoken.speculative.draft_tree.TreeSizer`) up to this many
drafted tokens (on SmolLM2 with its EAGLE head, a cap of 24 brought no more)."""


def sizes_trees(method: str, temperature: float, calibrate: bool = False) -> bool:
    """Whether ``--budget auto`` sizes each tree for ``method`` (greedy DySpec's ranked tree)
    rather than choosing one budget from the measured acceptance."""
    return method == "dyspec" and temperature == 0 and not calibrate


def cost_curve(target, draft, target_name: str, draft_name: str, refresh: bool = False) -> dict:
    """``{"target": {N: s}, "draft": s}`` for this machine, model, dtype and thread count,
    measured once and cached under the pertoken cache (measured again when the cached curve
    lacks a size of :data:`COST_SIZES`)."""
    from pertoken.atomic import write_json_atomic
    from pertoken.models import cache_dir
    from pertoken.speculative.draft_train import decode_seconds

    path = (cache_dir() / "speculative" /
            f"costs-{_machine_key(target_name, target)}-{_machine_key(draft_name, draft)}.json")
    if path.is_file() and not refresh:
        data = json.loads(path.read_text())
        curve = {int(k): v for k, v in data["target"].items()}
        if set(COST_SIZES) <= set(curve):
            return {"target": curve, "draft": data["draft"]}
    log.info("measuring the target's cost against tree size (once for this machine)")
    from pertoken.speculative.eagle import EagleHead, head_decode_seconds

    draft_seconds = (head_decode_seconds(draft) if isinstance(draft, EagleHead)
                     else decode_seconds(draft))
    data = {"target": measure_tree_costs(target, COST_SIZES), "draft": draft_seconds,
            "target_name": target_name, "draft_name": draft_name,
            "threads": torch.get_num_threads()}
    write_json_atomic(path, data)
    return {"target": data["target"], "draft": data["draft"]}


def choose_budget(costs: dict, acceptance: Sequence[float], max_budget: int = 64,
                  method: str = "tree") -> tuple[int, list[dict]]:
    """The tree budget with the most expected tokens per second.

    For each budget N, the expected tokens per step are ``1 + E[accepted]`` of Sequoia's best
    tree for the measured ``acceptance`` vector (for ``method="chain"``, of a chain of N
    first-ranked drafts), and a step costs one target pass over ``N + 1`` tokens (the
    non-decreasing fit of the measured costs) plus one draft call per tree layer. (Sizing a
    chain by the tree's model chose chains of 11-17 drafts, slower than 8, on SmolLM2 in bf16.)
    """
    from pertoken.speculative.draft_tree import (expected_accepted, interpolate_cost,
                                                 monotone_costs, static_shape)
    from pertoken.speculative.tree import depths

    target = monotone_costs(costs["target"])
    rows = []
    for n in range(1, max_budget + 1):
        shape = list(range(-1, n)) if method == "chain" else static_shape(acceptance, n)
        depth = depths(shape)
        tokens = 1 + expected_accepted(acceptance, shape)
        seconds = interpolate_cost(target, n + 1) + max(depth) * costs["draft"]
        rows.append({"budget": n, "expected_tokens_per_call": tokens,
                     "expected_tokens_per_second": tokens / seconds})
    best = max(rows, key=lambda r: r["expected_tokens_per_second"])
    return best["budget"], rows


MEASURED_BUDGETS = tuple(range(1, 13))
"""The budgets whose tokens per call ``--budget auto`` measures for sampled DySpec."""


def measures_budget(method: str, temperature: float, calibrate: bool = False) -> bool:
    """Whether ``--budget auto`` picks ``method``'s budget from its steps measured at each
    budget (:func:`choose_measured_budget`) rather than from the acceptance model and the cost
    curve: for sampled DySpec, whose trees accept fewer tokens than the model of a static tree
    predicts (SmolLM2's EAGLE head at T=1: 1.60 tokens per call at budget 3 and 1.70 at 6, where
    the model predicts 1.91 and 2.15; it chose 4 or 7 where 3 runs fastest)."""
    return method == "dyspec" and temperature > 0 and not calibrate


def measure_budget_steps(target, draft, prompts: Sequence[Sequence[int]], method: str,
                         temperature: float, budgets: Sequence[int] = MEASURED_BUDGETS,
                         top_k: int = 0, top_p: float = 1.0, eos_token_id=None,
                         max_new_tokens: int = 48, seed: int = 0,
                         draft_temperature: float | None = None) -> list[dict]:
    """For each budget, ``method``'s tokens per target call decoding ``prompts`` (seeded) and
    its mean seconds per step drafting and in the target (the tree pass and verification)."""
    from pertoken.speculative.generate import generate

    rows = []
    for budget in budgets:
        tokens = steps = 0
        drafting = verifying = 0.0
        for i, prompt in enumerate(prompts):
            out = generate(target, draft, list(prompt), method=method, budget=budget,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                           seed=seed + i, draft_temperature=draft_temperature)
            tokens += len(out.tokens)
            steps += len(out.steps)
            drafting += sum(step.draft_seconds for step in out.steps)
            verifying += sum(step.target_seconds for step in out.steps)
        rows.append({"budget": int(budget), "tokens_per_call": tokens / max(steps, 1),
                     "draft_seconds": drafting / max(steps, 1),
                     "target_seconds": verifying / max(steps, 1)})
    return rows


def choose_measured_budget(measured: Sequence[dict]) -> tuple[int, list[dict]]:
    """The budget with the most tokens per second from steps measured at each budget
    (:func:`measure_budget_steps`): tokens per call and seconds per step (drafting plus
    target) are each fitted non-decreasing in the budget (drafting more never accepts or costs
    less in expectation; the fit smooths the noise of a few prompts). The step times are
    measured in place rather than modelled from the cost curve and one draft call per layer,
    which on SmolLM2 at T=1 made a budget-3 step 5.5 ms dearer than a budget-1 step where in
    place they differ by 2.8 ms (46.1 and 43.3 ms on wiki-en prompts)."""
    from pertoken.speculative.draft_tree import _isotonic

    if not measured:
        raise ValueError("no measured budgets")
    rows = sorted(measured, key=lambda r: r["budget"])
    ones = [1.0] * len(rows)
    tokens = _isotonic([r["tokens_per_call"] for r in rows], ones)
    seconds = _isotonic([r["draft_seconds"] + r["target_seconds"] for r in rows], ones)
    out = [{"budget": row["budget"], "expected_tokens_per_call": t,
            "expected_tokens_per_second": t / s}
           for row, t, s in zip(rows, tokens, seconds)]
    best = max(out, key=lambda r: r["expected_tokens_per_second"])
    return best["budget"], out


def auto_budget(target, draft, tokenizer, target_name: str, draft_name: str,
                temperature: float, top_k: int = 0, top_p: float = 1.0,
                draft_temperature: float | None = None, method: str = "tree",
                calibrate: bool = False) -> int:
    """``--budget auto``: the budget from, measured on four wiki-en training prompts and
    cached, the acceptance vector with this machine's cost curve or, where
    :func:`measures_budget`, ``method``'s steps at each budget (timed: cached per machine,
    dtype and thread count, as the cost curve is)."""
    from pertoken.atomic import write_json_atomic
    from pertoken.models import cache_dir

    measured = measures_budget(method, temperature, calibrate)
    settings = f"{temperature}|{top_k}|{top_p}" + (
        f"|{draft_temperature}" if draft_temperature is not None else "")
    if measured:
        settings += (f"|{method}|{','.join(map(str, MEASURED_BUDGETS))}"
                     f"|{_machine_key(target_name, target)}|{_machine_key(draft_name, draft)}")
    key = hashlib.sha256(f"{target_name}|{draft_name}|{settings}".encode())
    kind = "tokens-per-call" if measured else "acceptance"
    path = cache_dir() / "speculative" / f"{kind}-{key.hexdigest()[:16]}.json"
    if path.is_file():
        data = json.loads(path.read_text())
    else:
        log.info("measuring the draft's %s (once for this pair of models)",
                 "tokens per call at each budget" if measured else "acceptance")
        prompts = load_prompts("wiki-en:4", tokenizer, split="train")
        common = dict(top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eos_token_id,
                      draft_temperature=draft_temperature)
        data = (measure_budget_steps(target, draft, prompts, method, temperature, **common)
                if measured else measure_acceptance(target, draft, prompts, temperature, **common))
        write_json_atomic(path, data)
    budget, _ = (choose_measured_budget(data) if measured else
                 choose_budget(cost_curve(target, draft, target_name, draft_name), data,
                               method=method))
    log.info("auto budget: %d", budget)
    return budget


@dataclass
class BenchConfig:
    model: str
    draft: str
    methods: list[str]
    budgets: list[int | str]
    temperatures: list[float]
    prompts: str = "wiki-en:8"
    max_new_tokens: int = 128
    prompt_tokens: int = 128
    repeats: int = 3
    dtype: str = "float32"
    top_k: int = 0
    top_p: float = 1.0
    calibration_prompts: int = 4
    seed: int = 0
    calibrate: bool = False
    """DySpec with values calibrated online (learnt on the calibration prompts first)"""
    assistant: str | None = None
    """the standalone draft for ``hf-assisted`` (default: the draft)"""
    lookup: int = 4
    """prompt-lookup tokens grafted into greedy DySpec trees (0: none)"""
    draft_temperature: float | None = None
    """the draft's temperature (default: generate's, 1.0 for an EAGLE head, 0.6 for a model)"""
    fp16_draft: bool = False
    """the draft (and the assistant) ran on float16 weights (recorded; the caller converts)"""

    def validate(self) -> None:
        from pertoken.speculative.generate import check_settings

        bad = [m for m in self.methods if m not in METHOD_CHOICES]
        if bad:
            raise UserError(f"unknown method {bad[0]!r}: choose from {', '.join(METHOD_CHOICES)}")
        for t in self.temperatures or [0.0]:
            check_settings(t, self.top_p, 1, self.lookup, self.draft_temperature)
        for b in self.budgets:
            if b != "auto" and (not isinstance(b, int) or b < 1):
                raise UserError(f"budget must be a positive number or auto, got {b!r}")
        if self.repeats < 1 or self.max_new_tokens < 1:
            raise UserError("repeats and max-new-tokens must be positive")


class _CallCounter:
    """Counts forward calls of a module (for transformers' own generate loops)."""

    def __init__(self, model) -> None:
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def _hf_generate(target, draft, prompt, budget, temperature, cfg: BenchConfig, eos):
    counter = _CallCounter(target)
    kwargs = {"max_new_tokens": cfg.max_new_tokens, "eos_token_id": eos,
              "pad_token_id": eos if eos is not None else 0}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=cfg.top_k or None,
                      top_p=cfg.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if draft is not None:
        kwargs["assistant_model"] = draft
        if budget is not None:
            kwargs.update(num_assistant_tokens=budget, num_assistant_tokens_schedule="constant")
    ids = torch.tensor([list(prompt)])
    try:
        with torch.inference_mode():
            out = target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        counter.close()
    tokens = out[0, ids.shape[1]:].tolist()
    # every target call counts: the first one (the prompt) yields the first token, as a
    # verification pass does in our loop, whose prefill of the prompt less its last token
    # yields none
    return tokens, counter.calls, []


def run_bench(target, draft, tokenizer, cfg: BenchConfig, progress: bool = True,
              assistant=None) -> dict:
    """Every (method, budget, temperature) on the same prompts in this process. Runs are
    interleaved (for each repeat, for each prompt, every configuration in turn), so that a
    machine whose speed drifts over minutes affects all configurations alike. ``hf-assisted``
    uses ``assistant`` (a standalone draft model), by default ``draft``."""
    from tqdm.auto import tqdm

    from pertoken.speculative.draft_tree import Calibration, static_shape
    from pertoken.speculative.generate import generate

    cfg.validate()
    eos = tokenizer.eos_token_id
    prompts = load_prompts(cfg.prompts, tokenizer, cfg.prompt_tokens)
    name = cfg.prompts.rpartition(":")[0]
    calibration_prompts = load_prompts(f"{name}:{cfg.calibration_prompts}", tokenizer, cfg.prompt_tokens,
                               split="train" if name != "chat" else "heldout",
                               skip=int(cfg.prompts.rpartition(":")[2]) if name == "chat" else 0)
    from pertoken.speculative.eagle import EagleHead

    needs_draft = any(m not in ("ar", "hf-ar") for m in cfg.methods)
    if needs_draft and draft is None:
        raise UserError("these methods need a --draft model")
    assistant = assistant if assistant is not None else draft
    if "hf-assisted" in cfg.methods and isinstance(assistant, EagleHead):
        raise UserError("hf-assisted needs a standalone draft model (transformers cannot use "
                        "an EAGLE head): pass --assistant")
    acceptance, costs, auto = {}, None, {}
    uses_tree_model = "tree" in cfg.methods or "auto" in cfg.budgets
    if needs_draft and uses_tree_model:
        for t in cfg.temperatures:
            acceptance[t] = measure_acceptance(target, draft, calibration_prompts, t, top_k=cfg.top_k,
                                               top_p=cfg.top_p, eos_token_id=eos,
                                               draft_temperature=cfg.draft_temperature)
            log.info("acceptance at T=%s: %s", t, [round(a, 3) for a in acceptance[t]])
    measured, auto_measured = {}, {}  # sampled DySpec's tokens per call at each budget
    if "auto" in cfg.budgets:
        costs = cost_curve(target, draft, cfg.model, cfg.draft)
        for t in cfg.temperatures:
            auto[t] = {m: choose_budget(costs, acceptance[t], method=m)[0]
                       for m in ("chain", "tree")}
            if "dyspec" in cfg.methods and measures_budget("dyspec", t, cfg.calibrate):
                measured[t] = measure_budget_steps(
                    target, draft, calibration_prompts, "dyspec", t, top_k=cfg.top_k,
                    top_p=cfg.top_p, eos_token_id=eos, draft_temperature=cfg.draft_temperature)
                auto_measured[t] = choose_measured_budget(measured[t])[0]
                log.info("dyspec's auto budget at T=%s from measured tokens per call: %d", t,
                         auto_measured[t])

    configs = []  # (method, budget, temperature, budget chosen by auto)
    for t in cfg.temperatures:
        for method in cfg.methods:
            if method in ("ar", "hf-ar"):
                configs.append((method, None, t, False))
                continue
            budgets = list(cfg.budgets)
            if method == "hf-assisted":
                budgets = [None] + [b for b in budgets if b != "auto"]  # None: HF's defaults
            for b in budgets:
                chosen = b
                if b == "auto":
                    chosen = (AUTO_MAX_BUDGET if sizes_trees(method, t, cfg.calibrate)
                              else auto_measured[t] if measures_budget(method, t, cfg.calibrate)
                              else auto[t]["chain" if method == "chain" else "tree"])
                configs.append((method, chosen, t, b == "auto"))
    shapes = {c: static_shape(acceptance[c[2]], c[1]) for c in configs if c[0] == "tree"}
    # DySpec's calibration (draft share -> acceptance) is learnt on the calibration prompts
    # first, as a running server would have it; every timed run starts from that state
    calibrations = {}
    for c in configs:
        if cfg.calibrate and c[0] in ("dyspec", "dyspec-heap"):
            calibrations[c] = Calibration()
            for prompt in calibration_prompts:
                generate(target, draft, list(prompt), method=c[0], budget=c[1], temperature=c[2],
                         top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                         eos_token_id=eos, seed=cfg.seed, calibration=calibrations[c],
                         draft_temperature=cfg.draft_temperature)

    runs: dict[tuple, list[dict]] = {
        c: [{"tokens": 0, "calls": 0, "seconds": 0.0, "histogram": Counter(), "outputs": [],
             "tree_sizes": []}
            for _ in range(cfg.repeats)] for c in configs}
    bar = tqdm(total=cfg.repeats * len(configs) * len(prompts), desc="speculative bench",
               disable=not progress, unit="gen")
    for repeat in range(cfg.repeats):
        for i, prompt in enumerate(prompts):
            seed = cfg.seed + 1000 * repeat + i
            for config in configs:
                method, budget, t, _ = config
                run = runs[config][repeat]
                start = time.perf_counter()
                if method.startswith("hf-"):
                    torch.manual_seed(seed)
                    tokens, n_calls, accepted = _hf_generate(
                        target, assistant if method == "hf-assisted" else None, prompt, budget,
                        t, cfg, eos)
                else:
                    out = generate(target, draft if method != "ar" else None, list(prompt),
                                   method=method, budget=budget or 1, temperature=t,
                                   top_k=cfg.top_k, top_p=cfg.top_p,
                                   max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                   seed=seed, tree_shape=shapes.get(config),
                                   calibration=copy.deepcopy(calibrations.get(config, False)),
                                   lookup=cfg.lookup, draft_temperature=cfg.draft_temperature,
                                   tree_costs=(costs["target"] if config[3] and sizes_trees(
                                       method, t, cfg.calibrate) else None))
                    tokens, n_calls = out.tokens, len(out.steps)
                    run["tree_sizes"] += [s.tree_size for s in out.steps]
                    accepted = [s.accepted for s in out.steps]
                run["seconds"] += time.perf_counter() - start
                run["tokens"] += len(tokens)
                run["calls"] += n_calls
                run["histogram"].update(accepted)
                run["outputs"].append(tokens)
                bar.update(1)
    bar.close()
    for config in configs:
        for run in runs[config]:
            run["histogram"] = {str(k): v for k, v in sorted(run["histogram"].items())}

    results = []
    ar_speed = {}
    for config in configs:
        method, budget, t, is_auto = config
        reps = runs[config]
        tps = statistics.median(r["tokens"] / r["seconds"] for r in reps)
        row = {"method": method, "budget": budget, "temperature": t,
               "tokens_per_call": reps[0]["tokens"] / max(reps[0]["calls"], 1),
               "tokens_per_second": tps, "auto_budget": is_auto,
               "tokens": reps[0]["tokens"], "target_calls": reps[0]["calls"],
               "accepted_histogram": reps[0]["histogram"],
               "mean_tree_size": (statistics.mean(reps[0]["tree_sizes"])
                                  if reps[0]["tree_sizes"] else None),
               "tokens_per_second_runs": [r["tokens"] / r["seconds"] for r in reps]}
        if t == 0:
            row["same_output_as_ar"] = None
        results.append(row)
        if method == "ar":
            ar_speed[t] = row["tokens_per_second_runs"]
    for row, config in zip(results, configs):
        # the median over repeats of the ratio within each repeat (paired, same minutes)
        ar_runs = ar_speed.get(row["temperature"])
        row["speedup_vs_ar"] = (statistics.median(
            a / b for a, b in zip(row["tokens_per_second_runs"], ar_runs))
            if ar_runs else None)
        if row["temperature"] == 0 and "ar" in cfg.methods:
            ar_config = next(c for c in configs if c[0] == "ar" and c[2] == 0)
            row["same_output_as_ar"] = runs[config][0]["outputs"] == runs[ar_config][0]["outputs"]
    return {"model": cfg.model, "draft": cfg.draft, "assistant": cfg.assistant or cfg.draft,
            "draft_kind": "eagle" if isinstance(draft, EagleHead) else "model",
            "threads": torch.get_num_threads(),
            "fp32_gemm": fp32_gemm(target),
            "dtype": cfg.dtype, "prompts": cfg.prompts, "max_new_tokens": cfg.max_new_tokens,
            "calibrate": cfg.calibrate, "lookup": cfg.lookup, "fp16_draft": cfg.fp16_draft,
            "draft_temperature": cfg.draft_temperature,
            "repeats": cfg.repeats, "acceptance": {str(k): v for k, v in acceptance.items()},
            "auto_budget": {str(k): v for k, v in auto.items()},
            "auto_budget_dyspec_measured": {str(k): v for k, v in auto_measured.items()},
            "measured_tokens_per_call": {str(k): v for k, v in measured.items()},
            "costs": ({"target_ms": {str(k): 1000 * v for k, v in costs["target"].items()},
                       "draft_ms": 1000 * costs["draft"]} if costs else None),
            "results": results}
