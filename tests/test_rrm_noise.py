"""RRM's matching noise at several scales (noise_scales="uniform": each image's std drawn in
[0, noise_std]) against one fixed scale, from the recipe, the CLI and the demo."""
import pytest
import torch

from robust_fast import cli
from robust_fast.train import RRM, fit, load_checkpoint
from robust_fast.train.recipes import Batch

from test_demo_rrm import _args
from test_train import config, params, toy_data
from toy_models import SIZE, student, teacher


def test_uniform_scales_are_per_image_and_uniform_in_zero_to_noise_std():
    r = RRM(teacher(), noise_std=0.4, noise_scales="uniform")
    x = torch.rand(20000, 1, SIZE, SIZE)
    scales = r.noise_scale(x, torch.Generator().manual_seed(0))
    assert scales.shape == (20000, 1, 1, 1)
    s = scales.flatten()
    assert s.min() >= 0 and s.max() <= 0.4
    assert s.mean().item() == pytest.approx(0.2, abs=0.004)          # 0.4 / 2
    assert s.std().item() == pytest.approx(0.4 / 12 ** 0.5, abs=0.003)  # uniform's 0.4 / sqrt(12)
    for q in (0.1, 0.25, 0.5, 0.9):   # its quantiles: q * 0.4
        assert s.quantile(q).item() == pytest.approx(0.4 * q, abs=0.01)
    again = r.noise_scale(x, torch.Generator().manual_seed(0))
    assert torch.equal(scales, again)  # seeded
    assert RRM(teacher(), noise_std=0.2).noise_scale(x, torch.Generator()) == 0.2  # fixed: one for all


def _seen_by_teacher(r, x, seed):
    """The batch loss's noisy images (what the teacher's features were computed on) and the loss."""
    t = r.teacher
    seen = []
    real = t.features

    def spy(images):
        seen.append(images.clone())
        return real(images)

    t.features = spy
    try:
        net = r.trainable(student())
        r.batch_loss(Batch(net=net, model=net.model, x=x, y=torch.zeros(x.shape[0], dtype=torch.long), epoch=0,
                           generator=torch.Generator().manual_seed(seed)))
    finally:
        del t.features
    return seen[0]


@pytest.mark.parametrize("scales", ["fixed", "uniform"])
def test_each_images_noise_has_the_scale_the_option_says(scales):
    # mid-grey images and a small std: the clip to [0, 1] never bites, so the noise is exact
    x = torch.full((256, 1, SIZE, SIZE), 0.5)
    r = RRM(teacher(), noise_std=0.1, noise_scales=scales, cache_teacher=False)
    seen = _seen_by_teacher(r, x, seed=3)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    scale = 0.1 * torch.rand(x.shape[0], generator=g).view(-1, 1, 1, 1) if scales == "uniform" else 0.1
    torch.testing.assert_close(seen, x + scale * noise)  # the reference, drawn by hand
    spread = (seen - x).flatten(1).std(dim=1)             # each image's own noise std
    if scales == "uniform":
        assert spread.min() < 0.01 and spread.max() > 0.09 and spread.mean() == pytest.approx(0.05, abs=0.01)
    else:
        assert spread.min() > 0.07 and spread.max() < 0.13


def test_multiscale_matching_trains_the_student_and_never_changes_the_teacher():
    t, s = teacher(), student()
    before, student_before = params(t), params(s)
    r = RRM(t, lambda_ce=0.05, noise_std=0.3, noise_scales="uniform")
    assert not r.cache_teacher  # noisy inputs are new every time
    fit(r, s, toy_data(), config(epochs=2))
    assert all(torch.equal(a, b) for a, b in zip(before, t.parameters()))
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(student_before, s.parameters()))
    assert r.settings()["noise_scales"] == "uniform" and r.settings()["noise_std"] == 0.3


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_scales="log", noise_std=0.2), "noise_scales must be one of"),
    (dict(noise_scales="uniform"), "needs noise_std > 0"),
    (dict(noise_scales="uniform", noise_std=-0.1), "noise_std must be >= 0")])
def test_bad_noise_settings_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RRM(teacher(), **kwargs)


def test_the_default_is_one_fixed_scale():
    assert RRM(teacher(), noise_std=0.2).noise_scales == "fixed"
    assert _args().rrm_noise_scales is None
    from robust_fast.demo import DemoSettings, _recipe, demo_settings
    settings = demo_settings(_args())
    assert settings.rrm_noise_scales == "fixed" and settings.rrm_noise_std == 0.2
    recipe = _recipe("rrm", settings, teacher(), "t.pt", seed=0)
    assert (recipe.noise_scales, recipe.noise_std) == ("fixed", 0.2)
    settings = demo_settings(_args("--rrm-noise-scales", "uniform", "--rrm-noise", "0.4"))
    for name in ("rrm", "rrm_teacher_arch"):
        recipe = _recipe(name, settings, teacher(), "t.pt", seed=0)
        assert (recipe.noise_scales, recipe.noise_std) == ("uniform", 0.4)
    assert DemoSettings().rrm_noise_scales == "fixed"


def test_the_demo_names_a_uniform_scale_without_noise():
    from robust_fast.demo import demo_settings
    with pytest.raises(ValueError, match="--rrm-noise-scales"):
        demo_settings(_args("--rrm-noise-scales", "uniform", "--rrm-noise", "0"))
    assert cli.main(["demo", "--rrm-noise-scales", "uniform", "--rrm-noise", "0"]) == 2


def test_other_sections_refuse_the_noise_scales(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "crt", "--rrm-noise-scales", "uniform"])
    assert "--rrm-noise-scales" in capsys.readouterr().err


def test_noise_scales_from_the_cli_and_in_its_help(tmp_path, capsys):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    assert cli.main(["train", "standard", "--model", "wide_cnn", "--width", "4", "--limit", "64", "--epochs", "1",
                     "--eval-samples", "0", "--out", str(teacher_dir), "--no-progress"]) == 0
    assert cli.main(["train", "rrm", "--teacher", str(teacher_dir / "checkpoint.pt"), "--model", "wide_cnn",
                     "--width", "4", "--limit", "64", "--epochs", "1", "--eval-samples", "0", "--noise-std", "0.3",
                     "--noise-scales", "uniform", "--out", str(student_dir), "--no-progress"]) == 0
    settings = load_checkpoint(student_dir / "checkpoint.pt")["recipe_settings"]
    assert settings["noise_scales"] == "uniform" and settings["noise_std"] == 0.3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["train", "rrm", "--help"])
    text = capsys.readouterr().out
    assert "--noise-scales" in text and "uniform" in text


def test_the_demos_table_names_multiscale_noise():
    from robust_fast.demo import DemoSettings, variant
    settings = DemoSettings()
    assert "noise" not in variant("rrm", settings)
    settings.rrm_noise_scales, settings.rrm_noise_std = "uniform", 0.4
    assert variant("rrm", settings).endswith("noise std uniform in [0, 0.4]")
