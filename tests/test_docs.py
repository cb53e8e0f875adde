"""The docs check (`make docs-check`): every relative Markdown link resolves, heading anchors
included, and every repository file a page names in backticks exists. Fast: reads text only."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A backticked path that starts with one of these folders must exist in the repository.
CHECKED_FOLDERS = ("src/", "workflow/", "config/", "benchmarks/", "tests/", "docs/", "envs/", "requirements/")
PLACEHOLDER_MARKS = ("{", "<", "*", "…", "...")

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def doc_files(repo: Path) -> list[Path]:
    """The Markdown files the check covers."""
    files = [repo / name for name in ("README.md", "CONTRIBUTING.md", "config/README.md")]
    for folder in ("docs", "benchmarks"):
        files += sorted((repo / folder).rglob("*.md"))
    return [f for f in files if f.is_file()]


def without_code_blocks(text: str) -> str:
    """The text with fenced code blocks blanked out (their links and paths are not Markdown)."""
    return FENCE.sub("", text)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file offers: its headings' slugs (repeats get -1, -2, ...) and HTML anchors."""
    text = path.read_text(encoding="utf-8")
    found: set[str] = set(HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for heading in HEADING.findall(without_code_blocks(text)):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def link_problems(path: Path, repo: Path) -> list[str]:
    """Broken relative links (missing file or folder, or missing heading anchor) in one file."""
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub("", text)
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    problems = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        if file_part:
            base = repo if file_part.startswith("/") else path.parent
            linked = (base / file_part.lstrip("/")).resolve()
        else:
            linked = path
        where = f"{path.relative_to(repo)}: link ({target})"
        if not linked.exists():
            problems.append(f"{where}: no such file or folder")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{where}: no heading with anchor #{anchor} in {linked.relative_to(repo)}")
    return problems


def path_problems(path: Path, repo: Path) -> list[str]:
    """Backticked repository paths (e.g. `config/acdc.yaml`) that do not exist."""
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    problems = []
    for _, span in INLINE_CODE.findall(text):
        for token in span.split():
            token = token.strip("'\"(),;:")
            token = token.split("::", 1)[0]  # tests/test_x.py::test_name
            if not token.startswith(CHECKED_FOLDERS) or any(mark in token for mark in PLACEHOLDER_MARKS):
                continue
            if not (repo / token).exists():
                problems.append(f"{path.relative_to(repo)}: `{token}` does not exist")
    return problems


def docs_problems(repo: Path = REPO) -> list[str]:
    problems = []
    for path in doc_files(repo):
        problems += link_problems(path, repo) + path_problems(path, repo)
    return problems


def test_docs_links_and_named_files_exist():
    problems = docs_problems()
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_in_the_index():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    linked = {(REPO / "docs" / target.partition("#")[0]).resolve() for target in INLINE_LINK.findall(index)}
    pages = {p.resolve() for p in (REPO / "docs").rglob("*.md")} - {(REPO / "docs" / "README.md").resolve()}
    missing = sorted(str(p.relative_to(REPO)) for p in pages - linked)
    assert not missing, f"docs/README.md does not link: {missing}"


def test_the_check_fails_on_a_broken_link_a_missing_anchor_and_a_missing_file(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "here.py").write_text("")
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Second part\n")
    (tmp_path / "README.md").write_text(
        "# Title\n\n"
        "[fine](docs/page.md#second-part) [fine too](#title) `src/here.py` `src/{placeholder}.py`\n"
        "[gone](docs/missing.md) [no heading](docs/page.md#third-part) `src/missing.py`\n"
        "```\n[inside a code block](nowhere.md) src/not_checked.py\n```\n"
    )
    problems = docs_problems(tmp_path)
    assert len(problems) == 3, problems
    assert "README.md: link (docs/missing.md): no such file or folder" in problems
    assert any("#third-part" in p for p in problems)
    assert "README.md: `src/missing.py` does not exist" in problems


def test_github_slugs():
    assert github_slug("Why SRA-Seg fell behind BCP (issue 22, 2026-12-07)") == "why-sra-seg-fell-behind-bcp-issue-22-2026-12-07"
    assert github_slug("`blend` (the materialised blend bank, `sraseg blend`)") == "blend-the-materialised-blend-bank-sraseg-blend"
    assert github_slug("GPUs and other CUDA versions") == "gpus-and-other-cuda-versions"
