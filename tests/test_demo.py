import json

from pertoken import data
from pertoken.data import CORPORA
from pertoken.demo import DemoConfig, run_eval
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
