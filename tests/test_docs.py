"""The README and every page under docs/: each file's ```python blocks run as written, in
order, in one namespace per file (each block continues the one before); links resolve inside
the repository, anchors included."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def page_id(path):
    return os.path.relpath(path, ROOT)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def python_blocks(path):
    return re.findall(r"^```python\n(.*?)^```", read(path), flags=re.DOTALL | re.MULTILINE)


def anchors(path):
    """The fragment names GitHub gives a page's headings."""
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.DOTALL | re.MULTILINE)
    names = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        name, n = slug, 1
        while name in names:
            name, n = f"{slug}-{n}", n + 1
        names.add(name)
    return names


def test_the_docs_are_the_pages_the_readme_names():
    for path in PAGES[1:]:
        assert f"(docs/{os.path.basename(path)})" in read(README), path


def test_readme_has_a_short_complete_example_first():
    blocks = python_blocks(README)
    assert blocks
    first = blocks[0]
    assert len(first.strip().splitlines()) <= 15
    assert "import torch" in first and "model =" in first and "attacks.pgd(" in first


def test_readme_is_a_front_door():
    assert len(read(README).splitlines()) <= 250


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_snippets_run(path, capsys):
    blocks = python_blocks(path)
    if path != README and not blocks:
        pytest.skip("no python blocks")
    namespace = {"__name__": "docs"}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"{page_id(path)} python block {number}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"{page_id(path)} python block {number} failed: {type(exc).__name__}: {exc}\n{block}")
    if path == README:
        assert "accuracy: clean" in capsys.readouterr().out


@pytest.mark.parametrize("path", PAGES, ids=page_id)
def test_pages_point_only_inside_the_repository(path):
    text = read(path)
    assert "../shared" not in text and "/work/" not in text
    for target in re.findall(r"\]\(([^)\s]+)\)", text):  # every relative link resolves
        if "://" in target:
            continue
        file, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(resolved), target
        assert os.path.commonpath([resolved, ROOT]) == ROOT, target
        if fragment:
            assert resolved.endswith(".md") and fragment in anchors(resolved), target
