"""The README stays short enough to read in five minutes, and every relative link in it and in docs/
reaches a file, an image or a heading that exists."""

from __future__ import annotations

import re
from pathlib import Path

from support import REPO

README_MAX_LINES = 200  # issue 27: a newcomer reads it in five minutes; the rest lives in docs/

# [text](target) and ![alt](target); the target ends at the first blank or closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = "```"


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose_lines(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks: a link or heading in a code sample is not one."""
    lines, in_code = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith(FENCE):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, blanks to -, repeats -1, -2."""
    seen: dict[str, int] = {}
    for line in prose_lines(path):
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


def broken_links(path: Path) -> list[str]:
    """Each relative link of the page whose file is missing, or whose #anchor names no heading there."""
    broken = []
    for line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of this repository
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.name}: {target}: no such heading")
    return broken


def test_the_readme_is_under_200_lines():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move detail to a page under docs/"


def test_every_relative_link_and_image_in_the_readme_and_docs_exists():
    assert [problem for page in pages() for problem in broken_links(page)] == []


def test_the_link_check_finds_a_missing_file_image_and_heading(tmp_path):
    """The check above is only as good as broken_links: a page with one of each fault, and good links beside them."""
    (tmp_path / "there.md").write_text("# A heading: with `code`\n\n## A heading: with `code`\n")
    (tmp_path / "picture.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n"
        "[good](there.md#a-heading-with-code) [repeat](there.md#a-heading-with-code-1) ![good](picture.png)\n"
        "[self](#top) [web](https://example.com/missing.md)\n"
        "[gone](missing.md) ![gone](missing.png) [no heading](there.md#nowhere)\n"
        "```\n[in code](also-missing.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md: no such file",
        "page.md: missing.png: no such file",
        "page.md: there.md#nowhere: no such heading",
    ]
