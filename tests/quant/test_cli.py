"""``pertoken quant quantize`` end to end on a tiny model folder, and its bad input."""

import json
import os
import subprocess
import sys

import pytest

from pertoken.models import tiny_llama

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, "
                   f"and number {i * 7} follows {i}." for i in range(60))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    model, tokenizer = tiny_llama(hidden_size=64, intermediate_size=128)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "text.txt").write_text(TEXT)
    return root


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pertoken", *args], capture_output=True,
                          text=True, env=ENV, timeout=300)


def _ppl(model, root):
    done = _run("eval", "ppl", "--model", str(model), "--corpus", str(root / "text.txt"),
                "--split", "all", "--max-tokens", "400", "--window", "64",
                "--json", str(root / "ppl.json"))
    assert done.returncode == 0, done.stderr
    return json.loads((root / "ppl.json").read_text())["perplexity"]


def test_quantize_saves_a_folder_that_eval_ppl_loads(setup):
    out = setup / "w8a8"
    done = _run("quant", "quantize", "--model", str(setup / "tiny"), "--calib",
                f"{setup / 'text.txt'}:400,{setup / 'text.txt'}:200", "--length", "64",
                "-o", str(out))
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "quant_config.json").read_text())
    assert config["method"] == "outliertune" and config["calibration"]["tokens"] == 600
    assert [p["tokens"] for p in config["calibration"]["parts"]] == [400, 200]
    assert all(f["tokens"] > 0 for f in config["folded"].values())
    assert sum("scale" in f for f in config["folded"].values()) == 4  # one per norm
    assert sum("migration" in f for f in config["folded"].values()) == 4  # o_proj, down_proj
    base, quant = _ppl(setup / "tiny", setup), _ppl(out, setup)
    assert abs(quant / base - 1) < 0.02, (base, quant)


def test_gptq_weights_and_the_int8_head_from_the_command_line(setup):
    out = setup / "w6a6"
    done = _run("quant", "quantize", "--model", str(setup / "tiny"), "--calib",
                f"{setup / 'text.txt'}:600", "--length", "64", "--w-bits", "6", "--a-bits", "6",
                "--weights", "gptq", "--head", "--dynamic-alpha", "off", "-o", str(out))
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "quant_config.json").read_text())
    assert config["weights"] == "gptq" and config["dynamic_alpha"] is None
    assert config["embedding"] == "head" and config["linears"]["lm_head"]["w_bits"] == 8
    base, quant = _ppl(setup / "tiny", setup), _ppl(out, setup)
    assert abs(quant / base - 1) < 0.05, (base, quant)


@pytest.mark.parametrize("bad,message", [
    (["--w-bits", "5"], "w-bits must be 4, 6 or 8"),
    (["--a-bits", "4"], "4-bit activations"),
    (["--calib", "wiki-en:0"], "at least 1"),
    (["--calib", "nocount"], "CORPUS:TOKENS"),
    (["--calib", "wiki-en:100,nocount"], "CORPUS:TOKENS"),
    (["--method", "magic"], "invalid choice"),
    (["--dynamic-alpha", "lots"], "number in [0, 1] or 'off'"),
    (["--dynamic-alpha", "1.5"], "alpha must be in [0, 1]"),
])
def test_bad_input_exits_2_with_one_line(setup, bad, message):
    done = _run("quant", "quantize", "--model", str(setup / "tiny"), "-o",
                str(setup / "bad"), *bad)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_empty_calibration_corpus_and_an_unknown_family_exit_2(setup):
    (setup / "empty.txt").write_text("")
    done = _run("quant", "quantize", "--model", str(setup / "tiny"), "--calib",
                f"{setup / 'empty.txt'}:100", "-o", str(setup / "bad"))
    assert done.returncode == 2 and "calibration set is empty" in done.stderr, done.stderr

    from transformers import GPT2Config, GPT2LMHeadModel

    from pertoken.models import tiny_byte_tokenizer

    gpt2 = setup / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=260, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                               bos_token_id=1, eos_token_id=2)).save_pretrained(gpt2)
    tiny_byte_tokenizer().save_pretrained(gpt2)
    done = _run("quant", "quantize", "--model", str(gpt2), "--calib",
                f"{setup / 'text.txt'}:100", "-o", str(setup / "bad"))
    assert done.returncode == 2 and "not a model family" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
