"""pyproject.toml describes the package (setup.py only the extension), lists every subpackage,
and the repository stands alone (a LICENSE, docs inside it, local bench results ignored)."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_build_system_and_metadata():
    config = pyproject()
    requires = " ".join(config["build-system"]["requires"])
    for name in ("setuptools", "wheel", "ninja", "torch"):
        assert name in requires, name
    project = config["project"]
    assert project["scripts"]["robust-fast"] == "robust_fast.cli:main"
    assert {"test", "torchattacks"} <= set(project["optional-dependencies"])
    assert any(d.startswith("torch") for d in project["dependencies"])
    import robust_fast
    assert project["version"] == robust_fast.__version__


def test_every_subpackage_is_listed():
    settings = pyproject()["tool"]["setuptools"]
    found = {"robust_fast.kernels", "robust_fast.benchmarks"}
    for folder, _, files in os.walk(os.path.join(ROOT, "robust_fast")):
        if "__init__.py" in files:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert set(settings["packages"]) == found
    assert settings["package-dir"] == {"robust_fast.kernels": "kernels", "robust_fast.benchmarks": "benchmarks"}


def test_setup_py_only_builds_the_extension():
    with open(os.path.join(ROOT, "setup.py")) as f:
        source = f.read()
    for key in ("name=", "version=", "install_requires", "entry_points", "packages="):
        assert key not in source, key
    assert "ext_modules" in source


def test_repository_stands_alone():
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))
    assert os.path.isfile(os.path.join(ROOT, "docs", "architecture.md"))
    for name in ("README.md", os.path.join("docs", "architecture.md"), os.path.join("docs", "benchmarks.md")):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert "shared/" not in f.read(), name


def test_local_bench_results_are_ignored_by_git():
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/local/pgd.json"], cwd=ROOT)
    assert done.returncode == 0
    done = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/pgd.json"], cwd=ROOT)
    assert done.returncode == 1  # the reference stays tracked
