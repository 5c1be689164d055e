import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pertoken import data
from pertoken.data import (CORPORA, HELDOUT_FRACTION, build_corpus, is_chinese, is_german,
                           list_corpora, open_corpus, split_of, take_bytes, user_files)
from pertoken.errors import UserError
from pertoken.htmltext import html_sections


def test_split_is_deterministic_and_near_five_percent():
    keys = [f"doc-{i}" for i in range(20000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    frac = splits.count("heldout") / len(keys)
    assert abs(frac - HELDOUT_FRACTION) < 0.006


@given(st.text())
def test_split_of_is_a_pure_function_of_the_key(key):
    assert split_of(key) == split_of(str(key))
    assert split_of(key) in ("train", "heldout")


@pytest.fixture
def fake_corpus(monkeypatch):
    """A named corpus over a generated source, to test building without the real packages."""
    docs = [(f"k{i}", f"document number {i}\nwith two lines") for i in range(400)]
    corpus = data.NamedCorpus("fake", "a test corpus", "en", lambda: iter(docs))
    monkeypatch.setitem(CORPORA, "fake", corpus)
    return docs


def test_built_splits_are_disjoint_complete_and_deterministic(fake_corpus):
    meta = build_corpus("fake")
    corpus = open_corpus("fake")
    train, heldout = list(corpus.documents("train")), list(corpus.documents("heldout"))
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(t for _, t in fake_corpus)
    assert list(corpus.documents("all")) == train + heldout
    assert heldout == [t for k, t in fake_corpus if split_of(k) == "heldout"]
    assert meta["splits"]["heldout"]["documents"] == len(heldout)
    assert meta["splits"]["train"]["bytes"] == sum(len(t.encode()) for t in train)
    again = build_corpus("fake", force=True)
    assert again["splits"] == meta["splits"]  # same content, same hashes


def test_list_corpora_reports_built_sizes(fake_corpus):
    build_corpus("fake")
    row = [r for r in list_corpora() if r["name"] == "fake"][0]
    assert row["built"] and row["documents"] == 400
    assert row["bytes"] == sum(len(t.encode()) for _, t in fake_corpus)


def test_union_corpus_is_the_union_of_member_splits(monkeypatch, fake_corpus):
    other = [(f"o{i}", f"other {i}") for i in range(100)]
    monkeypatch.setitem(CORPORA, "other", data.NamedCorpus("other", "", "en", lambda: iter(other)))
    monkeypatch.setitem(CORPORA, "both", data.NamedCorpus("both", "", "en",
                                                          members=("fake", "other")))
    meta = build_corpus("both")
    both = open_corpus("both")
    for split in ("train", "heldout"):
        expected = list(open_corpus("fake").documents(split)) + list(open_corpus("other").documents(split))
        assert list(both.documents(split)) == expected
        assert meta["splits"][split]["documents"] == len(expected)


def test_missing_debian_package_says_what_to_install(monkeypatch, tmp_path):
    corpus = data.NamedCorpus("needs-pkg", "", "en", lambda: iter([]), debian_package="some-doc",
                              needs_path=str(tmp_path / "absent"))
    monkeypatch.setitem(CORPORA, "needs-pkg", corpus)
    with pytest.raises(UserError, match="apt-get install some-doc"):
        open_corpus("needs-pkg")


def test_empty_source_is_a_user_error(monkeypatch):
    monkeypatch.setitem(CORPORA, "empty", data.NamedCorpus("empty", "", "en", lambda: iter([])))
    with pytest.raises(UserError, match="empty"):
        build_corpus("empty")


def test_wiki_en_builds_from_its_package():
    corpus = open_corpus("wiki-en")
    first = next(corpus.documents("heldout"))
    assert len(first) > 100
    meta = build_corpus("wiki-en")
    total = meta["splits"]["train"]["documents"] + meta["splits"]["heldout"]["documents"]
    assert total > 9000
    assert 0.03 < meta["splits"]["heldout"]["documents"] / total < 0.07


def test_text_files_split_into_paragraph_documents(tmp_path):
    f = tmp_path / "a.txt"
    paragraphs = [f"paragraph {i}\nline two of {i}" for i in range(300)]
    f.write_text("\n\n\n".join(paragraphs) + "\n")
    corpus = open_corpus(str(f))
    assert list(corpus.documents("all")) == paragraphs
    train, heldout = list(corpus.documents("train")), list(corpus.documents("heldout"))
    assert sorted(train + heldout) == sorted(paragraphs) and heldout and not set(train) & set(heldout)


def test_jsonl_with_text_field_and_invalid_utf8(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"body": f"doc {i}"}) for i in range(50)]
    f.write_bytes(("\n".join(lines) + "\n").encode() + b'{"body": "bad \xff byte"}\n')
    docs = list(open_corpus(str(f), text_field="body").documents("all"))
    assert docs[:50] == [f"doc {i}" for i in range(50)]
    assert docs[50] == "bad \ufffd byte"
    with pytest.raises(UserError, match="no field 'text'"):
        list(open_corpus(str(f)).documents("all"))


def test_folders_and_globs_name_their_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    assert [p.name for p in user_files(str(tmp_path))] == ["a.txt", "b.md"]
    assert [p.name for p in user_files(str(tmp_path / "**" / "*.md"))] == ["b.md"]
    with pytest.raises(UserError, match="matches no files"):
        user_files(str(tmp_path / "*.nothing"))
    with pytest.raises(UserError, match="no corpus"):
        open_corpus(str(tmp_path / "absent.txt"))
    with pytest.raises(UserError, match="no corpus"):
        open_corpus("no-such-corpus")


def test_unknown_split_is_a_user_error(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="split"):
        list(open_corpus(str(f)).documents("validation"))


def test_take_bytes_cuts_at_a_character_boundary():
    docs = list(take_bytes(["ab", "cd", "é€x"], 7))
    assert docs == ["ab", "cd", "é"]
    assert sum(len(d.encode()) for d in docs) <= 7


def test_language_filters():
    assert is_german("Die Datei wird mit dem Befehl nicht gelöscht, und das ist gut.")
    assert not is_german("The file is not deleted by the command, and that is good.")
    assert is_chinese("请注意，这个软件包会禁用 cron 的任务。")
    assert not is_chinese("Please note that this package disables cron jobs.")


def test_html_sections_keep_main_text_and_drop_navigation():
    page = """<html><head><title>T</title><style>p{}</style></head><body>
    <nav><a href="x">Home</a></nav>
    <div role="main"><h1>First<a class="headerlink" href="#f">¶</a></h1><p>Alpha   beta.</p>
    <pre>  code  line
    next</pre><ul><li>one<li>two</ul>
    <h1>Second</h1><p>Gamma &amp; delta<br>after break</p></div>
    <div class="footer">footer text</div></body></html>"""
    first, second = html_sections(page)
    assert first.startswith("First\n\nAlpha beta.")
    assert "  code  line" in first and "¶" not in first and "Home" not in first
    assert "one" in first and "two" in first
    assert second.startswith("Second") and "Gamma & delta" in second and "after break" in second
    assert "footer" not in first + second


def test_html_sections_drop_rustdoc_boilerplate():
    page = """<main><nav class="sub">search</nav><section id="main-content">
    <h1>Struct std::vec::Vec<span class="out-of-band"><a class="srclink">source</a></span></h1>
    <details><summary class="hideme">Expand description</summary><p>A growable array.</p></details>
    <h2 id="trait-implementations">Trait Implementations</h2><p>impl Clone for Vec</p>
    <h2 id="blanket-implementations">Blanket Implementations</h2>
    <div id="blanket-implementations-list"><p>impl&lt;T&gt; From&lt;T&gt; for T</p></div>
    </section></main>"""
    (text,) = html_sections(page)
    assert text.startswith("Struct std::vec::Vec") and "A growable array." in text
    assert "impl Clone for Vec" in text
    for gone in ("search", "source", "Expand description", "Blanket", "From<T>"):
        assert gone not in text


def test_every_named_corpus_has_a_source_or_members():
    for corpus in CORPORA.values():
        assert (corpus.source is None) != (not corpus.members)
        for member in corpus.members:
            assert member in CORPORA and CORPORA[member].language == corpus.language
