"""Plain text from documentation HTML (Sphinx, mdBook, DocBook), with the stdlib HTMLParser.

Written by hand because no installed library does this offline with the controls we need: keep
only the page's main region when it has one, drop navigation, tables of contents, permalink
marks and rustdoc's repeated boilerplate, keep ``<pre>`` blocks verbatim, and cut the page into sections at ``<h1>`` headings (an
mdBook ``print.html`` holds a whole book).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
         "source", "track", "wbr"}
_SKIP_TAGS = {"script", "style", "nav", "head", "header", "footer", "noscript", "svg", "button"}
_SKIP_CLASSES = {"headerlink", "toc", "docnav", "wy-nav-side", "sphinxsidebar", "related",
                 "rst-footer-buttons", "sidetoc", "nav-chapters", "nav-wrapper", "menu-bar",
                 # rustdoc: source links, run buttons, tooltips repeating the page, toggle labels
                 "rightside", "srclink", "test-arrow", "notable-traits", "hideme", "out-of-band"}
# rustdoc's blanket and auto-trait impls are the same boilerplate on every type page
_SKIP_IDS = {"blanket-implementations", "blanket-implementations-list",
             "synthetic-implementations", "synthetic-implementations-list"}
_BLOCK = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "blockquote", "pre",
          "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "br", "hr", "figure",
          "figcaption", "main", "body"}


def _is_main(tag: str, attrs: dict) -> bool:
    return tag == "main" or attrs.get("role") == "main" or attrs.get("itemprop") == "articleBody"


def _skips(tag: str, attrs: dict) -> bool:
    if tag in _SKIP_TAGS or attrs.get("role") == "navigation" or attrs.get("id") in _SKIP_IDS:
        return True
    classes = set((attrs.get("class") or "").split())
    return bool(classes & _SKIP_CLASSES)


class _Extractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool, bool]] = []  # tag, skip, main, pre
        self.sections_all: list[list[str]] = [[]]
        self.sections_main: list[list[str]] = [[]]
        self.saw_main = False

    def _state(self) -> tuple[bool, bool, bool]:
        return self.stack[-1][1:] if self.stack else (False, False, False)

    def _emit(self, text: str, main: bool) -> None:
        self.sections_all[-1].append(text)
        if main:
            self.sections_main[-1].append(text)

    def handle_starttag(self, tag, attrs):
        attrs = {k: (v or "") for k, v in attrs}
        skip, main, pre = self._state()
        if tag == "h1" and not skip:
            self.sections_all.append([])
            if main:
                self.sections_main.append([])
        if tag in _BLOCK and not skip:
            self._emit("\n", main)
        if tag in _VOID:
            return
        new_main = main or _is_main(tag, attrs)
        self.saw_main |= new_main
        self.stack.append((tag, skip or _skips(tag, attrs), new_main, pre or tag == "pre"))

    def handle_startendtag(self, tag, attrs):
        skip, main, _ = self._state()
        if tag in _BLOCK and not skip:
            self._emit("\n", main)

    def handle_endtag(self, tag):
        if not any(entry[0] == tag for entry in self.stack):
            return
        while self.stack:
            top = self.stack.pop()
            if top[0] == tag:
                break
        if tag in _BLOCK:
            skip, main, _ = self._state()
            if not skip:
                self._emit("\n", main)

    def handle_data(self, data):
        skip, main, pre = self._state()
        if skip:
            return
        if not pre:
            data = re.sub(r"\s+", " ", data)
        self._emit(data, main)


def _tidy(parts: list[str]) -> str:
    text = "".join(parts)
    lines = [line.rstrip() for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if not line.strip():
            if out and out[-1] != "":
                out.append("")
            continue
        out.append(line if line.startswith(" ") and _looks_code(line) else line.lstrip())
    return "\n".join(out).strip("\n")


def _looks_code(line: str) -> bool:
    return len(line) - len(line.lstrip(" ")) >= 2


def html_sections(html: str) -> list[str]:
    """Text of an HTML page, one string per ``<h1>`` section (empty sections dropped)."""
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    sections = parser.sections_main if parser.saw_main else parser.sections_all
    return [text for text in (_tidy(parts) for parts in sections) if text.strip()]


def html_text(html: str) -> str:
    """Text of an HTML page as one string, sections separated by blank lines."""
    return "\n\n".join(html_sections(html))
