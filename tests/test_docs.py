"""Cross-references into the math reference: every "docs/math.md §N" cited in the repository's
.py and .md files names a section that docs/math.md has, by a path that leads to that file."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MATH_DOC = REPO / "docs" / "math.md"
SKIP_DIRS = {"__pycache__", "build", "dist", "runs", "node_modules"}
# The old name of the reference, which lived outside the repository; spelt in two pieces so that
# this file does not cite it.
OLD_NAME = "MATH" + ".md"

SECTION = r"\d+(?:\.\d+)*"
HEADING = re.compile(rf"^#{{2,6}}\s+({SECTION})\.?\s+\S")
# An optional relative path, the file name, then "§N" or a range "§N-M".
CITATION = re.compile(rf"((?:\.\./|[\w.-]+/)*)math\.md\s*§\s*({SECTION})(?:\s*[-–]\s*({SECTION}))?")
LOCAL_REF = re.compile(rf"§\s*({SECTION})(?:\s*[-–]\s*({SECTION}))?")


def source_files():
    """The repository's .py and .md files, without hidden folders and build output."""
    for path in sorted(REPO.rglob("*")):
        parts = path.relative_to(REPO).parts
        if any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.suffix in (".py", ".md") and path.is_file():
            yield path


def sections() -> set[str]:
    return {m.group(1) for line in MATH_DOC.read_text().splitlines() if (m := HEADING.match(line))}


def cited(first: str, last: str | None) -> list[str]:
    """Section ids a citation names: "4", or every section of a top-level range such as "1-2"."""
    if last is None:
        return [first]
    if first.isdigit() and last.isdigit() and int(first) <= int(last):
        return [str(k) for k in range(int(first), int(last) + 1)]
    return [first, last]


def test_math_reference_keeps_the_six_numbered_sections():
    found = sections()
    for number in ("1", "2", "3", "4", "5", "6"):
        assert number in found, f"docs/math.md has no '## {number}.' section"
    # Subsections are numbered inside their section, so "§4.3" style citations work too.
    assert {"1.3", "3.3", "4.3", "5.4"} <= found


def test_every_citation_names_an_existing_section_by_a_working_path():
    found = sections()
    problems, count = [], 0
    for path in source_files():
        rel = path.relative_to(REPO)
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in CITATION.finditer(line):
                count += 1
                # Markdown resolves a path from its own folder; code and docstrings from the root.
                base = path.parent if path.suffix == ".md" else REPO
                target = (base / m.group(1) / "math.md").resolve()
                if target != MATH_DOC:
                    want = os.path.relpath(MATH_DOC, base)
                    problems.append(f"{rel}:{lineno}: '{m.group(0)}' should cite '{want} §...'")
                for section in cited(m.group(2), m.group(3)):
                    if section not in found:
                        problems.append(f"{rel}:{lineno}: '{m.group(0)}' but docs/math.md has no §{section}")
    assert count >= 10, f"found only {count} citations of docs/math.md; is the pattern still right?"
    assert not problems, "broken math-reference citations:\n" + "\n".join(problems)


def test_math_reference_refers_to_its_own_sections():
    found = sections()
    missing = [f"line {lineno}: §{s}"
               for lineno, line in enumerate(MATH_DOC.read_text().splitlines(), 1)
               for m in LOCAL_REF.finditer(line) for s in cited(m.group(1), m.group(2)) if s not in found]
    assert not missing, "docs/math.md refers to sections it does not have:\n" + "\n".join(missing)


def test_nothing_cites_the_old_external_reference():
    offenders = [f"{path.relative_to(REPO)}:{lineno}"
                 for path in source_files()
                 for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
                 if OLD_NAME in line]
    assert not offenders, f"cite docs/math.md instead of {OLD_NAME}: " + ", ".join(offenders)
