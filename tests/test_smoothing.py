"""Randomized smoothing (robust_fast.certify.smoothing): certify and predict against closed forms
on a linear classifier, the random-draw contract (batched = one image at a time, repeatable),
the model's mode, argument errors, and the reported metrics."""
import math

import pytest
import torch
from torch import nn

from robust_fast.certify import smoothing
from robust_fast.certify.smoothing import (ABSTAIN, SmoothedCertificate, average_certified_radius, certified_accuracy,
                                           certified_accuracy_table, certify, plot_certified_accuracy, predict)

stats = pytest.importorskip("scipy.stats")

SIGMA = 0.5
W = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)  # |w| = 5


class LinearClassifier(nn.Module):
    """Class 1 where w.x + b > 0, else class 0: P(f(x + d) = 1) = Phi((w.x + b) / (sigma |w|)).
    (Logits (0, w.x + b); a matrix-vector product, far faster than a 4 -> 2 float64 nn.Linear.)"""
    def __init__(self, bias: float = 0.0):
        super().__init__()
        self.w = nn.Parameter(W.clone())
        self.b = bias

    def forward(self, x):
        score = x @ self.w + self.b
        return torch.stack([torch.zeros_like(score), score], 1)


def linear_classifier(bias: float = 0.0) -> nn.Module:
    return LinearClassifier(bias)


def point_with(p_class1: float, copies: int) -> torch.Tensor:
    """`copies` rows of the point where P(f(x + d) = 1) = p_class1."""
    margin = SIGMA * W.norm() * stats.norm.ppf(p_class1)
    return (margin * W / W.norm() ** 2).repeat(copies, 1)


def cp_lower(k, n, alpha):
    return 0.0 if k == 0 else stats.beta.ppf(alpha, k, n - k + 1)


def certify_failure_probability(p: float, n0: int, n: int, alpha: float) -> float:
    """P(certify returns a wrong class, or class 1 with a radius above the true one), exactly,
    for the linear classifier at P(class 1) = p (ties in the selection go to class 0)."""
    select_1 = stats.binom.sf(n0 // 2, n0, p)
    miss_1 = sum(stats.binom.pmf(k, n, p) for k in range(n + 1) if cp_lower(k, n, alpha) > p)
    wrong_0 = sum(stats.binom.pmf(k, n, 1 - p) for k in range(n + 1) if cp_lower(k, n, alpha) > 0.5)
    return select_1 * miss_1 + (1 - select_1) * wrong_0


def assert_rate(observed: int, trials: int, expected: float, sds: float = 4.5):
    spread = sds * math.sqrt(max(expected * (1 - expected), 1e-4) / trials)
    assert abs(observed / trials - expected) <= spread, (observed, trials, expected)


def test_certified_radius_is_sound_and_fails_at_the_rate_of_the_bound():
    p, trials, n0, n, alpha = 0.9, 3000, 10, 100, 0.1
    true_radius = SIGMA * stats.norm.ppf(p)  # = |w.x + b| / |w|
    x = point_with(p, trials)
    assert abs((x[0] @ W).item() / W.norm().item() - true_radius) < 1e-12
    result = certify(linear_classifier(), x, SIGMA, n0=n0, n=n, alpha=alpha, batch_size=4096,
                     generator=torch.Generator().manual_seed(0))
    answered = result.prediction != ABSTAIN
    failed = answered & ((result.prediction != 1) | (result.radius > true_radius + 1e-12))
    expected = certify_failure_probability(p, n0, n, alpha)
    assert expected <= alpha
    assert_rate(int(failed.sum()), trials, expected)
    # the hand computation, image by image
    chosen = result.selection_counts.argmax(1)
    for i in range(0, trials, 97):
        k = int(result.counts[i, chosen[i]])
        bound = cp_lower(k, n, alpha)
        assert result.pa_lower[i].item() == pytest.approx(bound, rel=1e-12, abs=1e-15)
        if bound > 0.5:
            assert result.prediction[i] == chosen[i]
            assert result.radius[i].item() == pytest.approx(SIGMA * stats.norm.ppf(bound), rel=1e-12)
        else:
            assert result.prediction[i] == ABSTAIN and result.radius[i] == 0


def test_at_the_papers_level_the_radius_stays_below_the_true_one():
    p, trials, n0, n, alpha = 0.99, 500, 100, 1000, 0.001
    true_radius = SIGMA * stats.norm.ppf(p)
    result = certify(linear_classifier(), point_with(p, trials), SIGMA, n0=n0, n=n, alpha=alpha, batch_size=8192,
                     generator=torch.Generator().manual_seed(1))
    failed = (result.prediction != ABSTAIN) & ((result.prediction != 1) | (result.radius > true_radius))
    expected = certify_failure_probability(p, n0, n, alpha)
    assert expected <= alpha
    assert int(failed.sum()) <= 3  # expected * trials < 1
    assert (result.prediction == 1).all()
    assert result.radius.max() <= SIGMA * stats.norm.ppf(alpha ** (1 / n)) + 1e-12  # the cap of n samples


def test_certify_abstains_on_the_boundary_at_the_level():
    trials, n, alpha = 3000, 100, 0.1
    result = certify(linear_classifier(), point_with(0.5, trials), SIGMA, n0=10, n=n, alpha=alpha, batch_size=4096,
                     generator=torch.Generator().manual_seed(2))
    answered = int((result.prediction != ABSTAIN).sum())
    # either class chosen, its count ~ Binomial(n, 1/2): certified only when the bound clears 1/2
    expected = sum(stats.binom.pmf(k, n, 0.5) for k in range(n + 1) if cp_lower(k, n, alpha) > 0.5)
    assert expected <= alpha
    assert_rate(answered, trials, expected)
    assert (result.radius[result.prediction == ABSTAIN] == 0).all()


def test_predict_abstains_on_the_boundary_at_the_tests_level():
    trials, n, alpha = 3000, 100, 0.1
    result = predict(linear_classifier(), point_with(0.5, trials), SIGMA, n=n, alpha=alpha, batch_size=4096,
                     generator=torch.Generator().manual_seed(3))
    answered = int((result.prediction != ABSTAIN).sum())
    expected = sum(stats.binom.pmf(k, n, 0.5) for k in range(n + 1)
                   if stats.binomtest(k, n, 0.5).pvalue <= alpha)
    assert expected <= alpha
    assert_rate(answered, trials, expected)
    assert answered > 0  # some answers, so the rate is measured, not only bounded
    far = predict(linear_classifier(), point_with(0.999, 50), SIGMA, n=n, alpha=alpha,
                  generator=torch.Generator().manual_seed(3))
    assert (far.prediction == 1).all()


def test_the_p_value_is_the_two_sided_binomial_test():
    top = torch.tensor([5, 10, 60, 50, 1, 7, 100])
    second = torch.tensor([5, 0, 40, 49, 0, 3, 0])
    got = smoothing._two_sided_p_value(top, second)
    for t, s, p in zip(top.tolist(), second.tolist(), got.tolist()):
        assert p == pytest.approx(stats.binomtest(t, t + s, 0.5).pvalue, rel=1e-9)


class SmallCNN(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def small_problem(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(), torch.rand(6, 1, 6, 6)


SETTINGS = dict(n0=7, n=23, alpha=0.05, batch_size=16)


def test_batched_certification_equals_one_image_at_a_time():
    model, x = small_problem()
    generator = torch.Generator().manual_seed(11)
    batched = certify(model, x, 0.3, generator=generator, **SETTINGS)
    for i in range(x.shape[0]):
        alone = certify(model, x[i:i + 1], 0.3, generator=generator, indices=[i], **SETTINGS)
        for field in ("prediction", "radius", "pa_lower", "counts", "selection_counts"):
            assert torch.equal(getattr(alone, field)[0], getattr(batched, field)[i]), (i, field)
    # another order, with each image's index, and a shard of the set
    order = torch.tensor([4, 1, 5, 0, 3, 2])
    shuffled = certify(model, x[order], 0.3, generator=generator, indices=order, **SETTINGS)
    assert torch.equal(shuffled.counts, batched.counts[order])
    shard = certify(model, x[2:5], 0.3, generator=generator, indices=range(2, 5), **SETTINGS)
    assert torch.equal(shard.counts, batched.counts[2:5])
    # predict keeps the same contract
    batched = predict(model, x, 0.3, n=23, batch_size=16, generator=generator)
    alone = predict(model, x[3:4], 0.3, n=23, batch_size=16, generator=generator, indices=[3])
    assert torch.equal(alone.counts[0], batched.counts[3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batched_equals_one_image_at_a_time():
    model, x = small_problem()
    model = model.cuda()  # x stays on the CPU: it moves to the model's device
    generator = torch.Generator().manual_seed(11)
    batched = certify(model, x, 0.3, generator=generator, **SETTINGS)
    assert batched.counts.device.type == "cpu"
    assert int(batched.counts.sum()) == x.shape[0] * SETTINGS["n"]
    for i in range(x.shape[0]):
        alone = certify(model, x[i:i + 1].cuda(), 0.3, generator=generator, indices=[i], **SETTINGS)
        assert torch.equal(alone.counts[0], batched.counts[i]) and torch.equal(alone.radius[0], batched.radius[i])


def test_noise_streams_are_keyed_on_seed_index_and_stage():
    # pinned: a change here changes every stored certification
    assert smoothing.stream_seed(0, 0, 0) == 1279368494785126216
    assert smoothing.stream_seed(12345, 7, 1) == 5187813469240410051
    seeds = {smoothing.stream_seed(s, i, stage) for s in (0, 1) for i in range(50) for stage in (0, 1, 2)}
    assert len(seeds) == 300


def test_repeatable_under_a_seed_and_the_generator_left_alone():
    model, x = small_problem()
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    first = certify(model, x, 0.3, generator=generator, **SETTINGS)
    second = certify(model, x, 0.3, generator=torch.Generator().manual_seed(5), **SETTINGS)
    assert torch.equal(generator.get_state(), state)
    assert torch.equal(first.counts, second.counts) and torch.equal(first.radius, second.radius)
    other = certify(model, x, 0.3, generator=torch.Generator().manual_seed(6), **SETTINGS)
    assert not torch.equal(first.counts, other.counts)
    torch.manual_seed(9)
    a = certify(model, x, 0.3, **SETTINGS)
    torch.manual_seed(9)
    b = certify(model, x, 0.3, **SETTINGS)
    assert torch.equal(a.counts, b.counts)


def test_x_is_never_modified_and_its_layout_does_not_matter():
    model, x = small_problem()
    x = x.expand(6, 3, 6, 6).contiguous()
    model[0] = nn.Conv2d(3, 4, 3, padding=1)
    kept = x.clone()
    generator = torch.Generator().manual_seed(1)
    plain = certify(model, x, 0.3, generator=generator, **SETTINGS)
    assert torch.equal(x, kept)
    channels_last = certify(model, x.to(memory_format=torch.channels_last), 0.3, generator=generator, **SETTINGS)
    assert torch.equal(plain.counts, channels_last.counts)
    predict(model, x, 0.3, n=10, generator=generator)
    assert torch.equal(x, kept)


class ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def test_model_runs_in_eval_mode_and_each_flag_is_restored():
    model, x = small_problem()
    recorder = ModeRecorder()
    model.append(recorder)
    model.train()
    model[0].eval()  # a module set apart keeps its own flag
    flags = [m.training for m in model.modules()]
    certify(model, x, 0.3, **SETTINGS)
    predict(model, x, 0.3, n=5)
    assert recorder.seen and not any(recorder.seen)
    assert [m.training for m in model.modules()] == flags


def test_progress_bar_and_an_empty_batch():
    model, x = small_problem()
    result = certify(model, x[:2], 0.3, progress=True, **SETTINGS)
    assert result.prediction.shape == (2,)
    empty = certify(model, x[:0], 0.3, **SETTINGS)
    assert empty.prediction.shape == empty.radius.shape == (0,)
    assert predict(model, x[:0], 0.3, n=5).prediction.shape == (0,)


@pytest.mark.parametrize("change, argument", [
    (dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"), (dict(sigma=float("nan")), "sigma"),
    (dict(sigma="0.25"), "sigma"), (dict(n0=0), "n0"), (dict(n=0), "n"), (dict(n=2.5), "n"),
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"), (dict(alpha=True), "alpha"),
    (dict(batch_size=0), "batch_size"), (dict(generator=3), "generator"), (dict(indices=[0, 1]), "indices"),
    (dict(indices=[0, 1, 2, 3, 4, -5]), "indices"), (dict(progress="yes"), "progress"),
    (dict(x=torch.rand(6)), "x"), (dict(x=torch.zeros(6, 1, 6, 6, dtype=torch.long)), "x"),
    (dict(x=[[0.0]]), "x"), (dict(model=None), "model"),
])
def test_bad_arguments_name_themselves(change, argument):
    model, x = small_problem()
    arguments = dict(model=model, x=x, sigma=0.3, n0=5, n=5, alpha=0.01, batch_size=8)
    arguments.update(change)
    with pytest.raises((ValueError, TypeError), match=rf"certify: {argument} "):
        certify(arguments.pop("model"), arguments.pop("x"), arguments.pop("sigma"), **arguments)
    if "n0" not in change:
        arguments = dict(model=model, x=x, sigma=0.3, n=5, alpha=0.01, batch_size=8)
        arguments.update(change)
        with pytest.raises((ValueError, TypeError), match=rf"predict: {argument} "):
            predict(arguments.pop("model"), arguments.pop("x"), arguments.pop("sigma"), **arguments)


def test_a_model_without_class_logits_is_refused():
    _, x = small_problem()
    with pytest.raises(ValueError, match="logits of shape"):
        certify(nn.Flatten(0), x, 0.3, n0=2, n=2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        certify(nn.Sequential(nn.Flatten(), nn.Linear(36, 1)), x, 0.3, n0=2, n=2)


def hand_made() -> SmoothedCertificate:
    return SmoothedCertificate(prediction=torch.tensor([0, 1, ABSTAIN, 2, 1]),
                               radius=torch.tensor([0.3, 0.6, 0.0, 1.0, 0.25], dtype=torch.float64),
                               pa_lower=torch.tensor([0.7, 0.9, 0.4, 0.98, 0.69], dtype=torch.float64),
                               counts=torch.zeros(5, 3, dtype=torch.int64),
                               selection_counts=torch.zeros(5, 3, dtype=torch.int64),
                               sigma=0.5, n0=100, n=1000, alpha=0.001)


def test_certified_accuracy_and_acr_by_hand():
    result, labels = hand_made(), torch.tensor([0, 1, 1, 0, 1])  # right: images 0, 1, 4
    assert certified_accuracy(result, labels, 0.0) == pytest.approx(3 / 5)
    assert certified_accuracy(result, labels, [0.25, 0.3, 0.5, 0.6, 0.61]) == pytest.approx([3 / 5, 2 / 5, 1 / 5,
                                                                                            1 / 5, 0.0])
    assert average_certified_radius(result, labels) == pytest.approx((0.3 + 0.6 + 0.25) / 5)
    assert average_certified_radius(result, [3, 3, 3, 3, 3]) == 0.0
    with pytest.raises(ValueError, match="labels"):
        certified_accuracy(result, labels[:4], 0.0)


def test_table_and_figure(tmp_path):
    result, labels = hand_made(), torch.tensor([0, 1, 1, 0, 1])
    table = certified_accuracy_table({"gaussian": result, "crt": result}, labels, radii=(0.0, 0.5))
    lines = table.splitlines()
    assert lines[0] == "| result | r = 0 | r = 0.5 | ACR | abstained |"
    assert lines[2] == "| gaussian | 60.0 | 20.0 | 0.230 | 20.0% |"
    assert lines[3].startswith("| crt |")
    path = tmp_path / "certified.png"
    plot_certified_accuracy({"gaussian": result, "crt": result}, labels, str(path), title="test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# the batch size: the counts never depend on it; "auto" measures once and picks a candidate

def test_counts_do_not_depend_on_the_batch_size():
    model, x = small_problem()
    generator = torch.Generator().manual_seed(4)
    settings = dict(n0=7, n=23, alpha=0.05)
    reference = certify(model, x, 0.3, generator=generator, batch_size=16, **settings)
    # 1: one row per pass; 5, 23, 29: pieces of an image's stream split across passes; 1000: all at once
    for batch_size in (1, 5, 23, 29, 1000, "auto"):
        got = certify(model, x, 0.3, generator=generator, batch_size=batch_size, **settings)
        for field in ("counts", "selection_counts", "prediction", "radius"):
            assert torch.equal(getattr(got, field), getattr(reference, field)), (batch_size, field)
    base = predict(model, x, 0.3, n=23, batch_size=3, generator=generator)
    assert torch.equal(predict(model, x, 0.3, n=23, batch_size=64, generator=generator).counts, base.counts)


def test_streams_longer_than_a_noise_block_split_across_batches(monkeypatch):
    # blocks of 4 rows: n = 23 is 6 blocks; batch sizes below, between and above a block
    monkeypatch.setattr(smoothing, "NOISE_BLOCK_ROWS", 4)
    model, x = small_problem()
    generator = torch.Generator().manual_seed(2)
    reference = certify(model, x, 0.3, generator=generator, **dict(SETTINGS, batch_size=4))
    for batch_size in (3, 9, 200):
        got = certify(model, x, 0.3, generator=generator, **dict(SETTINGS, batch_size=batch_size))
        assert torch.equal(got.counts, reference.counts) and torch.equal(got.selection_counts,
                                                                         reference.selection_counts), batch_size
    assert int(reference.counts.sum()) == x.shape[0] * SETTINGS["n"]


def test_the_noise_block_shrinks_for_large_images():
    assert smoothing.noise_block_rows(784) == smoothing.NOISE_BLOCK_ROWS
    assert smoothing.noise_block_rows(3 * 224 * 224) == smoothing.NOISE_BLOCK_ELEMENTS // (3 * 224 * 224)
    assert smoothing.noise_block_rows(10 ** 9) == 1


class CountingModel(nn.Module):
    """SmallCNN that counts the rows of every forward pass."""
    def __init__(self):
        super().__init__()
        self.net = SmallCNN()
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.net(x)


def test_auto_picks_a_measured_candidate_and_caches_it():
    from robust_fast.certify import autobatch
    autobatch.clear_cache()
    torch.manual_seed(0)
    model, x = CountingModel(), torch.rand(3, 1, 6, 6)
    generator = torch.Generator().manual_seed(1)
    rows = x.shape[0] * (100 + 900)
    result = certify(model, x, 0.3, n0=100, n=900, generator=generator)  # "auto" is the default
    choice = autobatch.cached_choice(model, torch.device("cpu"), x[0])
    assert choice is not None and result.batch_size == choice.batch_size
    assert choice.batch_size in autobatch.CPU_CANDIDATES and choice.batch_size in choice.rows_per_s
    assert set(choice.rows_per_s) == set(autobatch.needed(torch.device("cpu"), rows))
    assert all(rate > 0 for rate in choice.rows_per_s.values())
    # the passes that counted: full batches of the choice, then the rest
    counted = model.batches[-math.ceil(rows / choice.batch_size):]
    assert counted[:-1] == [choice.batch_size] * (len(counted) - 1) and sum(counted) == rows
    # the second call measures nothing: every pass counts
    model.batches.clear()
    again = certify(model, x, 0.3, n0=100, n=900, generator=generator)
    assert autobatch.cached_choice(model, torch.device("cpu"), x[0]) is choice
    assert sum(model.batches) == rows and again.batch_size == choice.batch_size
    fixed = certify(model, x, 0.3, n0=100, n=900, generator=generator, batch_size=128)
    assert fixed.batch_size == 128
    assert torch.equal(fixed.counts, result.counts) and torch.equal(fixed.radius, result.radius)
    # another input shape is measured apart; a call that fits the smallest candidate runs in one pass
    model.batches.clear()
    small = predict(model, x[:1], 0.3, n=50, generator=generator)
    assert small.batch_size == 50 and model.batches == [50]
    autobatch.clear_cache()
    assert autobatch.cached_choice(model, torch.device("cpu"), x[0]) is None


def test_auto_times_only_the_candidates_a_call_can_fill():
    from robust_fast.certify import autobatch
    cpu = torch.device("cpu")
    assert autobatch.needed(cpu, 150) == (100, 200)
    assert autobatch.needed(cpu, 400) == (100, 200, 400)
    assert autobatch.needed(cpu, 10 ** 6) == autobatch.CPU_CANDIDATES
    assert autobatch.candidates(torch.device("cuda", 0)) == autobatch.GPU_CANDIDATES
    autobatch.clear_cache()
    model, x = CountingModel(), torch.rand(1, 1, 6, 6)
    certify(model, x, 0.3, n0=10, n=140)  # 150 rows: 100 and 200 timed
    assert set(autobatch.cached_choice(model, cpu, x[0]).rows_per_s) == {100, 200}
    certify(model, x, 0.3, n0=10, n=990)  # 1000 rows: measured again, up to 1000
    assert set(autobatch.cached_choice(model, cpu, x[0]).rows_per_s) == {100, 200, 400, 1000}
    autobatch.clear_cache()


class MemoryBoundModel(CountingModel):
    """Runs out of memory above `limit` rows, as a GPU would."""
    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"{x.shape[0]} rows")
        return super().forward(x)


def test_auto_stops_at_the_first_candidate_out_of_memory():
    from robust_fast.certify import autobatch
    autobatch.clear_cache()
    model, x = MemoryBoundModel(limit=250), torch.rand(2, 1, 6, 6)
    generator = torch.Generator().manual_seed(3)
    result = certify(model, x, 0.3, n0=100, n=2000, generator=generator)
    choice = autobatch.cached_choice(model, torch.device("cpu"), x[0])
    assert set(choice.rows_per_s) == {100, 200} and result.batch_size in (100, 200)
    assert choice.tried == max(autobatch.needed(torch.device("cpu"), 2 * 2100))  # not measured again
    assert max(model.batches) <= 250
    fixed = certify(model, x, 0.3, n0=100, n=2000, generator=torch.Generator().manual_seed(3), batch_size=100)
    assert torch.equal(fixed.counts, result.counts)
    # not even the smallest candidate fits: the error is the model's own, not a wrong choice
    with pytest.raises(torch.OutOfMemoryError):
        certify(MemoryBoundModel(limit=50), x, 0.3, n0=100, n=2000)
    autobatch.clear_cache()


def test_a_bad_batch_size_names_the_argument():
    model, x = small_problem()
    for bad, error in (("big", ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="batch_size"):
            certify(model, x, 0.3, n0=5, n=5, batch_size=bad)
        with pytest.raises(error, match="batch_size"):
            predict(model, x, 0.3, n=5, batch_size=bad)
