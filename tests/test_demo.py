import json

import pytest

from pertoken import data
from pertoken.data import CORPORA
from pertoken.demo import DemoConfig, run_eval, run_superbpe
from pertoken.models import ALIASES, DEFAULT_MODEL, find_package_file
from pertoken.report import build_report


def test_demo_eval_skips_corpora_it_cannot_build_and_feeds_the_report(tmp_path, monkeypatch, tiny):
    model, tok = tiny
    monkeypatch.setitem(CORPORA, "needs-pkg", data.NamedCorpus(
        "needs-pkg", "", "en", lambda: iter([]), debian_package="some-doc",
        needs_path=str(tmp_path / "absent")))
    config = DemoConfig(results_dir=tmp_path / "results", report=tmp_path / "r.html",
                        model="tiny", max_tokens=64, corpora=("wiki-en", "needs-pkg"))
    path = run_eval(config, model, tok)
    result = json.loads(path.read_text())
    assert [r["corpus"] for r in result["rows"]] == ["wiki-en"]
    assert result["rows"][0]["tokens"] == 64
    assert result["skipped"][0]["corpus"] == "needs-pkg"
    assert "apt-get install some-doc" in result["skipped"][0]["reason"]
    page = build_report(config.results_dir, config.report).read_text()
    assert "wiki-en" in page and "data:image/png;base64," in page


def test_demo_superbpe_compares_with_bpe_and_plots_the_curve(tmp_path):

    entry = ALIASES[DEFAULT_MODEL]
    if find_package_file(entry.package, entry.filename) is None:
        pytest.skip("default model not installed")
    config = DemoConfig(results_dir=tmp_path, model=DEFAULT_MODEL, superbpe_vocab=400,
                        superbpe_fractions=(0.0, 0.75, 1.0))
    result = json.loads(run_superbpe(config).read_text())
    names = [r["tokenizer"] for r in result["rows"]]
    assert names[0] == "BPE" and names[-1] == "smollm2-135m-instruct"
    assert result["rows"][0]["relative_tokens"] == 1.0
    assert len(result["plots"][0]["x"]) == 3
