import json
import subprocess
import sys

import pytest

from pertoken.cli import main


def run_cli(*args):
    """Run the console script in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "pertoken", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,needle", [
    (["eval", "ppl", "--model", "/no/such/model", "--corpus", "wiki-en"], "no model"),
    (["eval", "ppl", "--corpus", "no-such-corpus"], "no corpus"),
    (["eval", "ppl", "--max-tokens", "many"], "--max-tokens"),
    (["eval", "ppl", "--window", "0"], "--window"),
    (["eval", "ppl", "--split", "validation"], "--split"),
    (["data", "build", "no-such-corpus"], "no corpus"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_user_mistakes_exit_2_with_one_line(args, needle):
    done = run_cli(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0] and "Traceback" not in done.stderr


def test_eval_ppl_on_a_user_file_with_a_tiny_model_writes_json(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Paragraph {i} of a little test corpus." for i in range(40)))
    out = tmp_path / "out" / "ppl.json"
    code = main(["eval", "ppl", "--model", str(tmp_path / "m"), "--corpus", str(text),
                 "--split", "all", "--max-tokens", "200", "--window", "64", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"model", "corpus", "split", "tokens", "bytes", "perplexity",
                           "bits_per_byte", "seconds"}
    assert result["tokens"] == 200 and result["perplexity"] > 1
    assert not list(out.parent.glob(".*"))  # no temporary left behind


def test_empty_split_exits_2(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("")
    done = run_cli("eval", "ppl", "--model", str(tmp_path / "m"), "--corpus", str(text),
                   "--split", "all")
    assert done.returncode == 2 and "nothing to score" in done.stderr


def test_models_and_data_list_print_tables(capsys):
    assert main(["models", "list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out
    assert main(["data", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"wiki-en", "docs-en", "handbook-zh"}


def test_report_command_builds_html(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "demo-eval.json").write_text(json.dumps({"rows": [{"corpus": "x", "perplexity": 3.0}]}))
    assert main(["report", "--results-dir", str(results), "-o", str(tmp_path / "r" / "index.html")]) == 0
    assert "<table>" in (tmp_path / "r" / "index.html").read_text()
    assert main(["report", "--results-dir", str(tmp_path / "absent")]) == 2


def test_a_hub_id_in_the_local_cache_loads_without_network(tmp_path, tiny):
    """A model already in the Hugging Face cache is found by its hub id, offline."""
    import os

    model, tok = tiny
    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / "0123abcd"
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs" / "main").write_text("0123abcd")
    text = tmp_path / "t.txt"
    text.write_text("A few words to score.\n\nAnd a second paragraph.")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "pertoken", "eval", "ppl", "--model",
                           "someone/tiny-llama", "--corpus", str(text), "--split", "all",
                           "--json", str(tmp_path / "o.json")], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "o.json").read_text())["tokens"] > 10
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    done = subprocess.run([sys.executable, "-m", "pertoken", "eval", "ppl", "--model",
                           "someone/tiny-llama", "--corpus", str(text)], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 2 and "no model" in done.stderr
