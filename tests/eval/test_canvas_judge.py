"""The digits-canvas judge: held-out canvases score at the floor; noise, digits stuck in one place
and copies of the training canvases do not."""

from __future__ import annotations

import pytest
import torch

from diffit_toolkit.data.canvas import glyphs, make_canvases, paste
from diffit_toolkit.eval.canvas import CanvasMetric, load_canvas_classifier, to_canvas_tensor, train_canvas_classifier


@pytest.fixture(scope="module")
def metric():
    # a judge trained for 20 epochs, about 12 CPU-seconds (the shipped one: 40 epochs)
    return CanvasMetric(classifier=train_canvas_classifier(seed=0, epochs=20))


def test_judge_reads_the_digit_and_where_it_is(metric):
    assert metric.test_accuracy() > 0.25  # chance: 0.1; the shipped judge reaches 83 %
    assert metric.offset_error() < 1.5  # pixels; uniform guessing is off by about 2.7


def test_held_out_canvases_score_near_the_floor_and_broken_ones_far_above(metric):
    x, y, _ = make_canvases("floor")
    some = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:400]]
    real = metric.score(some)
    assert real.floor == pytest.approx(metric.floor(400)) and real.num_images == 400
    assert real.fd < 1.5 * real.floor
    assert 0.8 < real.copy_ratio < 1.25
    noisy = metric.score((some + 0.3 * torch.randn(some.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    assert noisy.fd > 5 * real.floor
    images, _ = glyphs("floor")
    centred = metric.score(paste(images, torch.full((len(images), 2), 4), 16))  # the right digits, always in the middle
    assert centred.fd > 5 * metric.floor(len(images))


def test_copies_of_training_canvases_show_in_the_copy_ratio_not_the_fd(metric):
    x, y, _ = make_canvases("train")
    score = metric.score(x, y)
    assert score.num_given == len(x) and score.num_images == metric.max_images == 1440
    assert score.copy_ratio < 0.05
    assert score.fd < 1.5 * score.floor
    assert score.accuracy > 0.25


def test_input_layouts_cache_and_errors(tmp_path, monkeypatch):
    import diffit_toolkit.eval.canvas as canvas_eval

    x, _, _ = make_canvases("reference")
    u8 = ((x[:4] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # NHWC as in an ADM .npz
    assert torch.allclose(to_canvas_tensor(u8), x[:4], atol=1 / 127)
    with pytest.raises(ValueError, match="16x16 gray"):
        to_canvas_tensor(torch.zeros(2, 1, 8, 8))
    # the cache file is written once and read back instead of training again
    monkeypatch.setattr(canvas_eval, "_MEMO", {})
    monkeypatch.setattr(canvas_eval, "train_canvas_classifier", lambda seed: train_canvas_classifier(seed, epochs=1, num=64))
    first = load_canvas_classifier(seed=3, cache=tmp_path / "judge.pt")
    monkeypatch.setattr(canvas_eval, "_MEMO", {})
    monkeypatch.setattr(canvas_eval, "train_canvas_classifier", lambda seed: pytest.fail("trained again"))
    again = load_canvas_classifier(seed=3, cache=tmp_path / "judge.pt")
    assert torch.equal(first.features(x[:8]), again.features(x[:8]))


def test_eval_command_picks_the_canvas_judge_for_16x16_gray_data():
    from diffit_toolkit.commands.eval import OFFLINE_SIZES, _offline_metric, _offline_metric_class

    assert OFFLINE_SIZES["digits_canvas"] == (16, 16)
    assert _offline_metric({"channels": 1, "resolution": 16, "num_classes": 0}) == "digits_canvas"
    assert _offline_metric({"channels": 1, "resolution": 16, "num_classes": 10}) == "digits_canvas"
    assert _offline_metric_class("digits_canvas") is CanvasMetric
    assert _offline_metric({"channels": 1, "resolution": 8, "num_classes": 10}) == "digits"


def test_the_ablation_scores_the_canvas_with_its_judge(tmp_path, monkeypatch):
    import math

    import diffit_toolkit.eval.canvas as canvas_eval
    from diffit_toolkit.eval.ablation import judge_for

    monkeypatch.setattr(canvas_eval, "_MEMO", {})
    monkeypatch.setattr(canvas_eval, "train_canvas_classifier", lambda seed: train_canvas_classifier(seed, epochs=1, num=64))
    name, judge, held_out = judge_for({"kind": "digits_canvas"}, tmp_path)
    assert name == "digits_canvas" and (tmp_path / canvas_eval.JUDGE_FILE).is_file() and 0 <= held_out <= 1
    x, _, _ = make_canvases("floor")
    row = judge(x[:50], None)  # unconditional samples: no labels, no accuracy
    assert row["num_images"] == row["num_given"] == 50 and math.isnan(row["accuracy"])
    assert row["fd"] >= 0 and row["floor"] > 0 and row["copy_ratio"] > 0


def test_the_judge_looks_past_pixel_nuisance_but_not_past_misplaced_digits(metric, monkeypatch):
    # 1 % stray pixels and a trace of blur cost far less than the right digits in the wrong
    # places: the judge rates what is drawn and where more than pixel texture. Trained without its
    # pixel augmentations, the same judge rates the stray pixels almost as badly as misplacement.
    import diffit_toolkit.eval.canvas as canvas_eval

    x, _, _ = make_canvases("floor")
    gen = torch.Generator().manual_seed(1)
    stray = torch.where(torch.rand(x.shape, generator=gen) < 0.01, torch.full_like(x, 0.5), x)
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0), 3, stride=1)
    images, _ = glyphs("floor")
    centred = paste(images.repeat(8, 1, 1), torch.full((len(x), 2), 4), 16)

    def fds(judge):
        return [judge.score(v).fd for v in (stray, 0.9 * x + 0.1 * blur, centred)]

    stray_fd, trace_fd, centred_fd = fds(metric)
    assert centred_fd > 10 * stray_fd and centred_fd > 10 * trace_fd
    monkeypatch.setattr(canvas_eval, "JUDGE_NOISE", 0.1)
    monkeypatch.setattr(canvas_eval, "JUDGE_STRAY_PIXELS", 0.0)
    plain = CanvasMetric(classifier=train_canvas_classifier(seed=0, epochs=20))
    plain_stray, _, plain_centred = fds(plain)
    assert plain_centred < 5 * plain_stray


def test_glyph_jitter_turns_and_scales_about_the_centre():
    import diffit_toolkit.eval.canvas as canvas_eval

    images, _ = glyphs("floor")
    gen = torch.Generator().manual_seed(0)
    jittered = canvas_eval.jitter_glyphs(images[:64], gen)
    assert jittered.shape == (64, 8, 8) and jittered.min() >= -1 - 1e-6 and jittered.max() <= 1 + 1e-6
    assert not torch.allclose(jittered, images[:64])
    still = canvas_eval.jitter_glyphs(images[:64], gen, rotation=0.0, scale=0.0)
    assert torch.allclose(still, images[:64], atol=1e-5)  # no turn, no scale: the glyphs themselves


def test_a_dataset_kind_declares_its_own_judge(tmp_path, plugin_system):
    """The judge belongs to the dataset plugin: a user's kind with one is scored like a built-in."""
    from diffit_toolkit.data import DatasetKind
    from diffit_toolkit.eval.ablation import judge_file, judge_for
    from diffit_toolkit.registry import datasets

    seen = []

    class Judged(DatasetKind):
        judge_file = "my_judge_v1.pt"

        @classmethod
        def judge(cls, path):
            seen.append(path)
            return (lambda images, labels: {"fd": 1.0, "accuracy": 0.5}), 0.9

    datasets.register("judged_probe", Judged)
    name, judge, held_out = judge_for({"kind": "judged_probe"}, tmp_path)
    assert (name, held_out, seen) == ("judged_probe", 0.9, [tmp_path / "my_judge_v1.pt"])
    assert judge(None, None) == {"fd": 1.0, "accuracy": 0.5} and judge_file("judged_probe") == "my_judge_v1.pt"
    assert judge_file("npz") == "" and judge_file("no_such_kind") == ""
    with pytest.raises(ValueError, match=r"data.kind must be a kind that has one \(digits, digits_canvas, judged_probe, "
                                         r"shapes, shapes_canvas\), got 'npz'"):
        judge_for({"kind": "npz"}, tmp_path)
