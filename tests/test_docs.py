"""The documentation holds what the code cites, and the README stays a front page.

Standard library and pytest only: no model runs.  What is checked:

- every ``docs/<path>`` named in the package, benchmarks, configs, tests, the README
  and the docs pages exists;
- every ``docs/design.md section N`` (or ``sections N-M``) has a ``## N.`` heading;
- every ``docs/<page>.md "Heading"`` names a heading of that page;
- every relative markdown link of the README and the docs pages resolves, anchors
  included (GitHub's heading slugs);
- the README has at most 300 lines, and neither it, the docs pages nor the package
  point outside the repository (``shared/``, ``SPEC.md``, ``reference/``);
- every file under ``configs/`` is listed on docs/configs.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DESIGN = DOCS / "design.md"
README_MAX_LINES = 300

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".json", ".cfg", ".ini"}

# A path under docs/ with one of the cited kinds of file.  The look-behind keeps
# "mydocs/x.md" or "a/docs/x.md" from counting as a citation of docs/x.md.
DOC_PATH = re.compile(r"(?<![\w./-])docs/[A-Za-z0-9_./-]+\.(?:md|csv|png|json)")
# "docs/design.md section 4", "docs/design.md sections 3-4", "docs/design.md section 2, rows 8-15";
# in the docs pages also "design.md section 6" (a link's text).
DESIGN_SECTION = re.compile(
    r"(?<![\w./-])(?:docs/)?design\.md`*\]?,?\s+sections?\s+(\d+)(?:\s*(?:-|–|to|and)\s*(\d+))?"
)
# docs/<page>.md "Heading" (the quoted heading right after the path, optionally after
# closing backticks and a comma: ``docs/baselines.md``, "The cost table").
QUOTED_HEADING = re.compile(r'(?<![\w./-])(docs/[A-Za-z0-9_./-]+\.md)`*,?\s*"([^"\n]+)"')
# [text](target) with a relative target (no scheme); images too.
MD_LINK = re.compile(r"\]\(([^()\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
OUTSIDE_PATHS = re.compile(r"(?<![\w-])shared/|SPEC\.md|(?<![\w-])reference/")


# -- helpers ---------------------------------------------------------------------


def text_files(*tops: str) -> list[Path]:
    """Text files under each top-level directory of the repository (sorted, this file excluded)."""
    files = []
    for top in tops:
        base = ROOT / top
        if base.is_file():
            files.append(base)
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts:
                if path.resolve() != THIS:
                    files.append(path)
    return files


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def docs_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def citing_files() -> list[Path]:
    """Every file whose docs/ citations must resolve."""
    return text_files("ahpa", "benchmarks", "configs", "tests") + [README] + docs_pages()


def rel(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:  # a scratch file of the helpers' own tests
        return path.as_posix()


def strip_code_blocks(text: str) -> str:
    """The markdown without fenced code blocks (their '#' lines are not headings)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def headings(path: Path) -> list[str]:
    """The text of every markdown heading of ``path``, in order."""
    found = []
    for line in strip_code_blocks(read(path)).splitlines():
        m = HEADING.match(line)
        if m:
            found.append(m.group(2))
    return found


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lowercase, punctuation other
    than '-' and '_' removed, each space -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """All anchors of a markdown file, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for h in headings(path):
        slug = github_slug(h)
        if slug in seen:
            seen[slug] += 1
            result.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            result.add(slug)
    return result


def design_section_numbers(path: Path | None = None) -> list[int]:
    """The N of every '## N. Title' heading (outside code blocks), in order."""
    text = strip_code_blocks(read(path or DESIGN))
    return [int(m.group(1)) for m in re.finditer(r"^## (\d+)\.\s", text, re.M)]


def cited_doc_paths(files: list[Path]) -> dict[str, list[str]]:
    """docs/ path -> the files citing it."""
    cited: dict[str, list[str]] = {}
    for f in files:
        for m in DOC_PATH.finditer(read(f)):
            cited.setdefault(m.group(0), []).append(rel(f))
    return cited


def cited_design_sections(files: list[Path]) -> dict[int, list[str]]:
    """design.md section number -> the places citing it ('file: excerpt')."""
    cited: dict[int, list[str]] = {}
    for f in files:
        for m in DESIGN_SECTION.finditer(read(f)):
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else first
            for n in range(first, last + 1):
                cited.setdefault(n, []).append(f"{rel(f)}: {m.group(0)!r}")
    return cited


def cited_headings(files: list[Path]) -> list[tuple[str, str, str]]:
    """(page, heading, citing file) for every docs/<page>.md "Heading" citation."""
    return [(m.group(1), m.group(2), rel(f)) for f in files for m in QUOTED_HEADING.finditer(read(f))]


def broken_links(path: Path) -> list[str]:
    """Relative markdown links of ``path`` whose file or anchor does not exist."""
    problems = []
    text = strip_code_blocks(read(path))
    for m in MD_LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not dest.exists():
            problems.append(f"{rel(path)}: link target {target!r} does not exist")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            problems.append(f"{rel(path)}: link target {target!r} lies outside the repository")
            continue
        if anchor:
            if dest.suffix != ".md":
                problems.append(f"{rel(path)}: anchor on a non-markdown file in {target!r}")
            elif anchor not in anchors(dest):
                problems.append(f"{rel(path)}: no heading of {rel(dest)} has the anchor #{anchor}")
    return problems


# -- the helpers themselves (so a test that passes is not passing by matching nothing) --


def test_helpers_find_what_they_should(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text(
        '"""See docs/design.md section 2, rows 8-15 and docs/design.md sections 3-4;\n'
        'also ``docs/baselines.md``, "The cost table" and docs/studies/toy/results.csv.\n'
        'Not citations: mydocs/other.md, a/docs/other.md, design.md sectional."""\n'
    )
    assert set(cited_doc_paths([sample])) == {"docs/design.md", "docs/baselines.md", "docs/studies/toy/results.csv"}
    assert sorted(cited_design_sections([sample])) == [2, 3, 4]
    assert [(p, h) for p, h, _ in cited_headings([sample])] == [("docs/baselines.md", "The cost table")]
    assert github_slug("11. Known contradictions with the paper") == "11-known-contradictions-with-the-paper"
    assert github_slug("Offline demo: `ahpa demo --task t2i`") == "offline-demo-ahpa-demo---task-t2i"
    assert github_slug("SiT-XL/2 at 256 px: counts beside Table 6 / I.21") == "sit-xl2-at-256-px-counts-beside-table-6--i21"
    assert github_slug("What it shows on the toy: the reverse of the paper's Fig. 2") == (
        "what-it-shows-on-the-toy-the-reverse-of-the-papers-fig-2")
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## 1. One\n\n```\n## 2. In a code block\n```\n\n## 3. Three\n\n## Same\n\n## Same\n")
    assert design_section_numbers(page) == [1, 3]
    assert anchors(page) == {"top", "1-one", "3-three", "same", "same-1"}


def test_helpers_detect_broken_links_and_anchors(tmp_path, monkeypatch):
    """A missing file, a missing anchor and a link leaving the repository are all reported."""
    repo = tmp_path / "repo"
    monkeypatch.setattr(sys.modules[__name__], "ROOT", repo)
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "page.md").write_text("# Title\n\n## A heading: with `code`\n\n```\n## not a heading\n```\n")
    readme = repo / "README.md"
    readme.write_text(
        "[ok](docs/page.md) [ok](docs/page.md#a-heading-with-code) [gone](docs/missing.md)\n"
        "[bad anchor](docs/page.md#not-a-heading) [outside](../elsewhere.md) [web](https://example.org)\n"
    )
    (tmp_path / "elsewhere.md").write_text("x\n")
    problems = broken_links(readme)
    assert len(problems) == 3, problems
    assert any("docs/missing.md" in p for p in problems)
    assert any("#not-a-heading" in p for p in problems)
    assert any("outside the repository" in p for p in problems)


# -- the repository ------------------------------------------------------------------


def test_cited_docs_files_exist():
    cited = cited_doc_paths(citing_files())
    assert "docs/design.md" in cited and "docs/baselines.md" in cited  # the code does cite them
    missing = {path: where for path, where in cited.items() if not (ROOT / path).is_file()}
    assert not missing, "cited but missing: " + "; ".join(f"{p} (cited by {', '.join(sorted(set(w)))})"
                                                          for p, w in sorted(missing.items()))


def test_design_has_every_cited_section():
    assert DESIGN.is_file(), "docs/design.md is missing"
    have = set(design_section_numbers())
    cited = cited_design_sections(citing_files())
    assert cited, "no 'docs/design.md section N' citation found: the pattern no longer matches the code"
    missing = {n: where for n, where in cited.items() if n not in have}
    assert not missing, "docs/design.md lacks a '## N.' heading for: " + "; ".join(
        f"section {n} (cited by {', '.join(where[:3])})" for n, where in sorted(missing.items()))


def test_design_sections_are_numbered_in_order():
    numbers = design_section_numbers()
    assert numbers[:9] == list(range(1, 10)), f"docs/design.md sections 1-9 in order, got {numbers}"
    assert numbers == list(range(1, len(numbers) + 1)), f"docs/design.md sections must be numbered 1, 2, 3 ...: {numbers}"
    titles = {int(h.split(".")[0]): h for h in headings(DESIGN) if re.match(r"\d+\.\s", h)}
    assert titles[10].startswith("10. Conventions")
    assert titles[11].startswith("11. Known contradictions")


def test_design_section_2_holds_the_15_layer_table():
    """The code cites 'docs/design.md section 2, rows 8-15' (the 512-channel layers)."""
    text = read(DESIGN)
    section = text.split("## 2.", 1)[1].split("\n## 3.", 1)[0]
    rows = {int(m.group(1)): m.group(2) for m in re.finditer(r"^\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*512x", section, re.M)}
    assert sorted(rows) == list(range(8, 16)), f"rows 8-15 of the layer table must be the 512-channel layers: {rows}"
    assert re.search(r"^\|\s*1\s*\|\s*encoder\.conv_in\s*\|", section, re.M)


def test_quoted_headings_exist():
    citations = cited_headings(citing_files())
    assert any(page == "docs/baselines.md" for page, _, _ in citations)  # the code does cite headings
    missing = []
    for page, heading, where in citations:
        path = ROOT / page
        if not path.is_file() or heading not in headings(path):
            missing.append(f'{page} "{heading}" (cited by {where})')
    assert not missing, "cited headings not found: " + "; ".join(sorted(set(missing)))


def test_readme_is_short():
    lines = read(README).splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}); move detail to docs/"


@pytest.mark.parametrize("path", [README, *docs_pages()], ids=lambda p: rel(p))
def test_no_paths_outside_the_repository(path):
    hits = [f"{rel(path)}:{i}: {line.strip()}" for i, line in enumerate(read(path).splitlines(), 1)
            if OUTSIDE_PATHS.search(line)]
    assert not hits, "the documentation must stand alone (no shared/, SPEC.md, reference/):\n" + "\n".join(hits)


def test_readme_links_to_docs_resolve():
    text = strip_code_blocks(read(README))
    doc_links = [t for t in MD_LINK.findall(text) if t.startswith("docs/")]
    assert doc_links, "README.md links to no docs/ page"
    assert not broken_links(README), "\n".join(broken_links(README))


@pytest.mark.parametrize("path", docs_pages(), ids=lambda p: rel(p))
def test_docs_links_resolve(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_package_stands_alone():
    hits = []
    for f in text_files("ahpa"):
        for i, line in enumerate(read(f).splitlines(), 1):
            if "SPEC section" in line or re.search(r"(?<![\w-])shared/", line):
                hits.append(f"{rel(f)}:{i}: {line.strip()}")
    assert not hits, "ahpa/ must not cite files outside the repository:\n" + "\n".join(hits)


def test_every_config_is_listed_on_configs_page():
    page = read(DOCS / "configs.md")
    missing = [rel(p) for p in sorted((ROOT / "configs").rglob("*.yaml")) if f"`{rel(p)}`" not in page]
    assert not missing, "docs/configs.md does not list: " + ", ".join(missing)
