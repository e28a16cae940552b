"""A user's mistake on the command line: one or two lines naming the option, a non-zero exit,
the traceback only on request; found before the work starts."""
import os

import pytest

from robust_fast import cli
from robust_fast.train import commands


def _short_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_bad_option_value_names_the_option_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "pgd_at", "--eps", "-1"])
    assert stop.value.code == 2
    _short_error(capsys, "--eps", "-1")


def test_a_missing_checkpoint_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nothing.pt")
    assert cli.main(["eval", missing]) == 1
    _short_error(capsys, "robust-fast eval: error:", missing, "--debug")
    with pytest.raises(FileNotFoundError):
        cli.main(["eval", missing, "--debug"])


def test_the_debug_environment_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_FAST_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["eval", str(tmp_path / "nothing.pt")])


def test_an_unwritable_output_folder_is_found_before_any_work(tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("the data was loaded before the output folder was checked")
    monkeypatch.setattr(commands, "load_fashion_mnist", no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = str(blocker / "run")  # a folder inside a file cannot exist
    assert cli.main(["train", "standard", "--out", out]) == 1
    _short_error(capsys, "--out", out)
    assert cli.main(["eval", str(tmp_path / "x.pt"), "--json", os.path.join(out, "eval.json")]) == 1
    _short_error(capsys, "--json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert cli.main(["train", "standard", "--out", str(folder)]) == 1
        _short_error(capsys, "--out", "cannot write there")
    finally:
        folder.chmod(0o700)


def test_samples_zero_is_an_error_not_nan(capsys):
    assert cli.main(["eval", "any.pt", "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
