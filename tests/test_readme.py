"""The README's Python snippets run as written: every ```python block, in order, in one
namespace (each continues the one before)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_has_a_short_complete_example_first():
    blocks = python_blocks()
    assert len(blocks) >= 2
    first = blocks[0]
    assert len(first.strip().splitlines()) <= 15
    assert "import torch" in first and "model =" in first and "attacks.pgd(" in first


def test_readme_snippets_run(capsys):
    namespace = {"__name__": "readme"}
    for number, block in enumerate(python_blocks(), start=1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"README python block {number} failed: {type(exc).__name__}: {exc}\n{block}")
    assert "accuracy: clean" in capsys.readouterr().out


def test_readme_points_only_inside_the_repository():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert "../shared" not in text and "/work/" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):  # every relative link resolves
        if "://" not in target:
            assert os.path.exists(os.path.join(ROOT, target)), target
