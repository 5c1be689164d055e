import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from pertoken.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pertoken", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sb") / "corpus.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog "
                                f"number {i * 7919}." for i in range(400)))
    return path


def test_train_then_eval_writes_a_loadable_folder_and_scores(tmp_path, text_file):
    out = tmp_path / "tok"
    assert main(["superbpe", "train", "--corpus", str(text_file), "--split", "all",
                 "--vocab-size", "600", "--transition", "400", "--special-tokens",
                 "<|endoftext|>", "-o", str(out)]) == 0
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "training.json"):
        assert (out / name).is_file()
    info = json.loads((out / "training.json").read_text())
    assert info["config"]["transition"] == 400 and info["stats"]["corpus_bytes"] > 0
    assert set(info["stats"]) >= {"stage1_seconds", "stage2_train_seconds", "stage1_peak_rss_mb",
                                  "stage2_peak_rss_mb", "replacement_chars"}
    hf = AutoTokenizer.from_pretrained(str(out))
    text = "the quick brown fox jumps over the lazy dog"
    assert hf.decode(hf(text)["input_ids"]) == text
    assert any("\u0120" in t.strip("\u0120") for t in hf.tokenize(text))  # a superword is used
    bpe = tmp_path / "bpe"
    assert main(["superbpe", "train", "--corpus", str(text_file), "--split", "all", "--bpe",
                 "--vocab-size", "600", "-o", str(bpe)]) == 0
    result_path = tmp_path / "eval.json"
    assert main(["superbpe", "eval", "--tokenizer", str(bpe), "--tokenizer", str(out / "tokenizer.json"),
                 "--corpus", str(text_file), "--split", "all", "--json", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    assert set(result) == {"corpus", "split", "bytes", "tokenizers"}
    first, second = result["tokenizers"]
    assert set(first) == {"name", "vocab_size", "tokens", "bytes_per_token", "relative_tokens",
                          "superword_entries", "encode_mb_per_s"}
    assert first["relative_tokens"] == 1.0 and first["superword_entries"] == 0
    assert second["relative_tokens"] < 1.0 and second["superword_entries"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--vocab-size", "100"], "byte symbols"),
    (["--vocab-size", "600", "--transition", "700"], "--transition"),
    (["--corpus", "/no/such/file.txt"], "no corpus"),
])
def test_bad_training_input_exits_2_with_one_line(tmp_path, text_file, args, needle):
    base = ["superbpe", "train", "--corpus", str(text_file), "--split", "all", "-o",
            str(tmp_path / "o")]
    done = run_cli(*base, *args)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert needle in done.stderr


def test_empty_corpus_and_existing_output_exit_2(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    done = run_cli("superbpe", "train", "--corpus", str(empty), "--split", "all", "--vocab-size",
                   "300", "-o", str(tmp_path / "o"))
    assert done.returncode == 2 and "empty" in done.stderr
    (tmp_path / "exists").mkdir()
    done = run_cli("superbpe", "train", "--corpus", str(empty), "-o", str(tmp_path / "exists"))
    assert done.returncode == 2 and "--overwrite" in done.stderr
    assert not (tmp_path / "o").exists()


def test_eval_of_a_missing_tokenizer_exits_2():
    done = run_cli("superbpe", "eval", "--tokenizer", "/no/such/tokenizer.json")
    assert done.returncode == 2 and "no tokenizer" in done.stderr
