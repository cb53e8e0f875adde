"""The HTML results page that `snakemake --report` embeds: the same tables as results.md, with captions."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from test_report import EXPERIMENTS, write_summary

from sraseg.report.run import collect_results, write_html, write_markdown


class Tables(HTMLParser):
    """Captions and cell texts of every <table>."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"caption": "", "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        if tag in ("caption", "td", "th"):
            self._in = tag
            if tag != "caption":
                self.tables[-1]["rows"][-1].append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "caption":
            self.tables[-1]["caption"] += data
        elif self._in:
            self.tables[-1]["rows"][-1][-1] += data


def test_html_page_holds_the_markdown_tables_with_captions(tmp_path: Path):
    results = tmp_path / "results" / "phantom"
    for seed, dice, hd95 in ((1, 0.80, 2.0), (2, 0.90, 4.0)):
        write_summary(results, "labeled_only", seed, dice, hd95)
        write_summary(results, "sraseg", seed, dice - 0.1, 6.0)
    frame = collect_results(results, EXPERIMENTS, [1, 2])
    provenance = ["- **WARNING: untrained** encoder `vit_small` <x>"]
    write_html(frame, tmp_path / "results.html", "Results: phantom", provenance, [1, 2])
    write_markdown(frame, tmp_path / "results.md", "Results: phantom", provenance, [1, 2])
    page = (tmp_path / "results.html").read_text()

    parser = Tables()
    parser.feed(page)
    assert len(parser.tables) == 4  # overall and per-class, in peer and mm modes
    assert all(t["caption"] for t in parser.tables)
    first = parser.tables[0]
    assert first["rows"][0] == ["experiment", "method", "Dice", "Jaccard", "HD95", "ASD"]
    std = np.std([80.0, 90.0], ddof=1)
    assert first["rows"][1][:3] == ["labeled_only", "labeled_only", f"85.00 ± {std:.2f}"]
    # every cell of every markdown table appears in the HTML tables, in the same order
    md_rows = [[c.strip() for c in line.strip("|").split("|")] for line in (tmp_path / "results.md").read_text().splitlines()
               if line.startswith("| ") and not line.startswith("|---")]  # fmt: skip
    html_rows = [row for t in parser.tables for row in t["rows"]]
    assert html_rows == md_rows
    assert "<strong>WARNING: untrained</strong>" in page and "<code>vit_small</code>" in page and "&lt;x&gt;" in page
    assert not re.search(r"<x>", page)
