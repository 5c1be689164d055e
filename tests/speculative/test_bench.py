import json
import subprocess
import sys

import pytest

from pertoken.errors import UserError
from pertoken.models import tiny_llama
from pertoken.speculative.bench import (BenchConfig, choose_budget, choose_measured_budget,
                                        load_prompts, measure_acceptance,
                                        measure_budget_steps, run_bench)


@pytest.fixture(scope="module")
def models():
    target, tok = tiny_llama(seed=5, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    draft, _ = tiny_llama(seed=6, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    return target, draft, tok


def test_bench_rows_are_consistent_and_greedy_outputs_agree(models):
    target, draft, tok = models
    cfg = BenchConfig(model="t", draft="d", methods=["ar", "hf-ar", "chain", "tree", "dyspec",
                                                     "hf-assisted"],
                      budgets=[3, "auto"], temperatures=[0.0, 1.0], prompts="chat:2",
                      max_new_tokens=10, repeats=2, calibration_prompts=2)
    result = run_bench(target, draft, tok, cfg, progress=False)
    assert {"model", "draft", "threads", "results"} <= set(result)
    rows = result["results"]
    for row in rows:
        assert {"method", "budget", "temperature", "tokens_per_call", "tokens_per_second",
                "speedup_vs_ar"} <= set(row)
        assert row["tokens_per_call"] >= 1.0
        if row["method"] in ("ar", "hf-ar"):
            assert row["tokens_per_call"] == 1.0
        if row["temperature"] == 0:
            assert row["same_output_as_ar"], row  # every method is exact at T=0 in fp32
        assert len(row["tokens_per_second_runs"]) == 2
    methods = {(r["method"], r["auto_budget"]) for r in rows}
    assert ("dyspec", True) in methods and ("hf-assisted", False) in methods
    from pertoken.speculative.bench import AUTO_MAX_BUDGET

    sized = next(r for r in rows if r["method"] == "dyspec" and r["auto_budget"]
                 and r["temperature"] == 0)  # greedy DySpec sizes each tree up to the cap
    assert sized["budget"] == AUTO_MAX_BUDGET and 1 <= sized["mean_tree_size"] <= AUTO_MAX_BUDGET
    # sampled DySpec's auto budget comes from its tokens per call measured at each budget
    sampled = next(r for r in rows if r["method"] == "dyspec" and r["auto_budget"]
                   and r["temperature"] == 1)
    measured = result["measured_tokens_per_call"]["1.0"]
    assert [m["budget"] for m in measured] == list(range(1, 13))
    assert sampled["budget"] == result["auto_budget_dyspec_measured"]["1.0"]
    assert sampled["budget"] == choose_measured_budget(measured)[0]
    tree = next(r for r in rows if r["method"] == "tree" and r["auto_budget"]
                and r["temperature"] == 1)
    assert tree["budget"] == result["auto_budget"]["1.0"]["tree"]  # the acceptance model's
    chain = next(r for r in rows if r["method"] == "chain" and r["auto_budget"]
                 and r["temperature"] == 1)
    assert chain["budget"] == result["auto_budget"]["1.0"]["chain"]
    assert json.loads(json.dumps(result)) == result


def test_calibrated_dyspec_bench_stays_exact_when_greedy(models):
    target, draft, tok = models
    cfg = BenchConfig(model="t", draft="d", methods=["ar", "dyspec", "dyspec-heap"], budgets=[4],
                      temperatures=[0.0], prompts="chat:2", max_new_tokens=12, repeats=1,
                      calibration_prompts=2, calibrate=True)
    result = run_bench(target, draft, tok, cfg, progress=False)
    assert result["calibrate"] is True
    assert all(r["same_output_as_ar"] for r in result["results"])


def test_acceptance_of_a_draft_equal_to_the_target_is_all_rank_zero_when_greedy(models):
    target, _, tok = models
    prompts = load_prompts("chat:2", tok)
    acc = measure_acceptance(target, target, prompts, 0.0, width=4, max_new_tokens=8)
    assert acc == [1.0, 0.0, 0.0, 0.0]


def test_budget_follows_the_cost_curve():
    acceptance = [0.5, 0.2, 0.1, 0.05]
    flat = {"target": {1: 1.0, 64: 1.0, 128: 1.0}, "draft": 0.0}
    steep = {"target": {1: 1.0, 2: 2.0, 128: 128.0}, "draft": 0.0}
    assert choose_budget(flat, acceptance)[0] == 64
    assert choose_budget(steep, acceptance)[0] == 1
    best, rows = choose_budget({"target": {1: 1.0, 8: 1.2, 16: 1.6, 64: 6.0}, "draft": 0.05},
                               acceptance)
    assert 1 < best < 64 and len(rows) == 64


def test_chain_budget_against_a_hand_computation():
    # a chain of n first-ranked drafts: 1 + 0.5 + ... + 0.5^n tokens for 1 + 0.1 n seconds
    costs = {"target": {1: 1.0, 64: 1.0}, "draft": 0.1}
    best, rows = choose_budget(costs, [0.5, 0.3, 0.1], max_budget=6, method="chain")
    for row in rows:
        n = row["budget"]
        tokens = 1 + sum(0.5 ** k for k in range(1, n + 1))
        assert row["expected_tokens_per_call"] == pytest.approx(tokens)
        assert row["expected_tokens_per_second"] == pytest.approx(tokens / (1 + 0.1 * n))
    assert best == 2  # 1.75 / 1.2 against 1.5 / 1.1 and 1.875 / 1.3
    assert choose_budget(costs, [0.5, 0.3, 0.1], max_budget=6)[0] > 2  # a tree goes wider


def test_measured_budget_against_a_hand_computation():
    measured = [{"budget": 1, "tokens_per_call": 1.4, "draft_seconds": 0.1, "target_seconds": 1.0},
                {"budget": 2, "tokens_per_call": 1.8, "draft_seconds": 0.2, "target_seconds": 1.0},
                # tokens per call 1.7 < 1.8: noise, pooled with budget 2's (1.75)
                {"budget": 3, "tokens_per_call": 1.7, "draft_seconds": 0.3, "target_seconds": 1.4},
                # a step of 1.6 s < 1.7: pooled with budget 3's (1.65)
                {"budget": 4, "tokens_per_call": 2.0, "draft_seconds": 0.2, "target_seconds": 1.4}]
    best, rows = choose_measured_budget(list(reversed(measured)))
    expected = [1.4 / 1.1, 1.75 / 1.2, 1.75 / 1.65, 2.0 / 1.65]
    assert [r["budget"] for r in rows] == [1, 2, 3, 4]
    assert [r["expected_tokens_per_second"] for r in rows] == pytest.approx(expected)
    assert [r["expected_tokens_per_call"] for r in rows] == pytest.approx([1.4, 1.75, 1.75, 2.0])
    assert best == 2
    measured[3]["tokens_per_call"] = 2.5  # now worth its cost
    assert choose_measured_budget(measured)[0] == 4
    with pytest.raises(ValueError):
        choose_measured_budget([])


def test_measured_budget_steps_are_those_of_generate(models):
    from pertoken.speculative.generate import generate

    target, draft, tok = models
    prompts = load_prompts("chat:2", tok)
    rows = measure_budget_steps(target, draft, prompts, "dyspec", 1.0, budgets=[2, 5],
                                max_new_tokens=10, seed=7)
    for row in rows:
        outs = [generate(target, draft, list(p), method="dyspec", budget=row["budget"],
                         temperature=1.0, max_new_tokens=10, seed=7 + i)
                for i, p in enumerate(prompts)]
        steps = sum(len(o.steps) for o in outs)
        assert row["tokens_per_call"] == sum(len(o.tokens) for o in outs) / steps
        assert row["draft_seconds"] > 0 and row["target_seconds"] > 0


@pytest.mark.parametrize("spec", ["wiki-en", "chat:0", "chat:x", "chat:100"])
def test_bad_prompt_specs_are_user_errors(models, spec):
    with pytest.raises(UserError):
        load_prompts(spec, models[2])


def test_cli_bench_writes_json_and_rejects_bad_input(tmp_path, models):
    target, draft, tok = models
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    base = [sys.executable, "-m", "pertoken", "speculative", "bench", "--model",
            str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--prompts", "chat:1",
            "--max-new-tokens", "6", "--repeats", "1"]
    out = tmp_path / "bench.json"
    done = subprocess.run(base + ["--methods", "ar,dyspec", "--budgets", "2",
                                  "--temperatures", "0", "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["results"]] == ["ar", "dyspec"]
    assert result["fp16_draft"] is True  # the default
    done = subprocess.run(base + ["--methods", "ar,dyspec", "--budgets", "2", "--temperatures",
                                  "0", "--no-fp16-draft", "--draft-temperature", "1.5", "--json",
                                  str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["fp16_draft"] is False and result["draft_temperature"] == 1.5
    assert result["results"][1]["same_output_as_ar"]
    for bad, needle in ((["--methods", "ar,nope"], "nope"), (["--budgets", "0"], "budget"),
                        (["--temperatures", "-1"], "temperature"), (["--top-p", "0"], "top-p"),
                        (["--lookup", "-1"], "lookup"),
                        (["--draft-temperature", "0"], "draft temperature")):
        done = subprocess.run(base + bad, capture_output=True, text=True)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr


def test_cost_curve_is_measured_once_and_cached(models, monkeypatch):
    from pertoken.speculative import bench

    target, draft, _ = models
    first = bench.cost_curve(target, draft, "t", "d")
    assert sorted(first["target"]) == list(bench.COST_SIZES) and first["draft"] > 0

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(bench, "measure_tree_costs", fail)
    assert bench.cost_curve(target, draft, "t", "d") == first
    # a curve cached before COST_SIZES grew lacks a size: it is measured again, and cached
    monkeypatch.setattr(bench, "COST_SIZES", bench.COST_SIZES + (96,))
    monkeypatch.setattr(bench, "measure_tree_costs",
                        lambda model, sizes: {n: 0.001 * n for n in sizes if model is target})
    again = bench.cost_curve(target, draft, "t", "d")
    assert again["target"] == {n: 0.001 * n for n in bench.COST_SIZES}
    monkeypatch.setattr(bench, "measure_tree_costs", fail)
    assert bench.cost_curve(target, draft, "t", "d") == again


def test_cost_cache_key_follows_the_cpu_instruction_sets(models, monkeypatch):
    import pertoken.bench
    from pertoken.speculative import bench

    target, _, _ = models
    monkeypatch.setattr(pertoken.bench, "cpu_model", lambda: ("Xeon", ["avx512f"]))
    plain = bench._machine_key("t", target)
    assert bench._machine_key("t", target) == plain
    monkeypatch.setattr(pertoken.bench, "cpu_model", lambda: ("Xeon", ["avx512f", "amx_bf16"]))
    assert bench._machine_key("t", target) != plain


def test_cost_cache_key_follows_the_fp32_kernel():
    from pertoken.models import PackedLinear, small_batch_layout, tiny_llama
    from pertoken.speculative import bench

    model = small_batch_layout(tiny_llama(seed=0)[0])
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not linears:
        pytest.skip("no packed fp32 GEMM in this torch build")
    before = bench._machine_key("t", model)
    for m in linears:
        m.fp32_kernel = "onednn" if m.fp32_kernel == "mkl" else "mkl"
    assert bench._machine_key("t", model) != before
    after = bench._machine_key("t", model)
    for m in linears:
        m.one_row_packed = not m.one_row_packed
    assert bench._machine_key("t", model) not in (before, after)
