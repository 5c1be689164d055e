import base64
import json
import re

from pertoken.report import build_report, plot_png, section_of


def test_report_has_a_section_per_method_tables_and_embedded_plots(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "demo-eval.json").write_text(json.dumps({
        "title": "Perplexity", "model": "m", "rows": [{"corpus": "wiki-en", "perplexity": 14.5},
                                                     {"corpus": "wiki-fr", "perplexity": 30.25}],
        "plots": [{"title": "bpb", "kind": "bar", "x": ["wiki-en", "wiki-fr"],
                   "series": {"m": [0.85, 1.2]}}]}))
    (results / "superbpe.json").write_text(json.dumps({
        "method": "superbpe", "plots": [{"title": "curve", "x": [0, 1, 2], "series": {"a": [1, 3, 2]},
                                         "xlabel": "t"}]}))
    (results / "broken.json").write_text("{not json")
    out = build_report(results, tmp_path / "report" / "index.html")
    page = out.read_text()
    assert re.findall(r'<h2 id="(\w+)"', page) == ["eval", "superbpe"]
    assert "wiki-fr" in page and "30.25" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http://" not in page and "https://" not in page  # opens without a server


def test_plot_png_is_a_png():
    assert plot_png({"x": [1, 2], "series": {"a": [1, 2]}, "logy": True}).startswith(b"\x89PNG")


def test_section_of_prefers_the_method_field(tmp_path):
    assert section_of(tmp_path / "demo-eval.json", {}) == "eval"
    assert section_of(tmp_path / "x.json", {"method": "acm"}) == "acm"
