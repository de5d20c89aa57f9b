"""The shapes-canvas judge: held-out images score at the floor; noise, misplaced or mis-sized
shapes and copies of the training images do not."""

from __future__ import annotations

import pytest
import torch

from diffit_toolkit.data.shapes_canvas import SHAPES_CANVAS_CLASSES, make_shapes_canvas
from diffit_toolkit.eval.shapes_canvas import ShapesCanvasMetric, load_shapes_canvas_classifier, train_shapes_canvas_classifier


@pytest.fixture(scope="module")
def metric():
    # a judge trained for two epochs, about 11 CPU-seconds (the shipped one: six)
    return ShapesCanvasMetric(classifier=train_shapes_canvas_classifier(seed=0, epochs=2))


def test_judge_reads_the_shape_where_it_is_and_its_size(metric):
    assert metric.test_accuracy() > 0.6  # chance: 0.25; the shipped judge reaches 99 %
    row, col, radius = metric.geometry_error().tolist()
    assert row < 1.0 and col < 1.0 and radius < 1.0  # pixels; guessing the mean is off by about 2.6 and 0.9


def _centred(x: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    shift = (8 - geometry[:, :2]).round().long()
    return torch.stack([torch.roll(x[i], tuple(shift[i].tolist()), (1, 2)) for i in range(len(x))])


def test_held_out_images_score_near_the_floor_and_broken_ones_far_above(metric):
    x, y, geometry = make_shapes_canvas("floor")
    real = metric.score(x[:720])
    assert real.floor == pytest.approx(metric.floor(720)) and real.num_images == 720
    assert real.fd < 2 * real.floor and 0.8 < real.copy_ratio < 1.25
    assert metric.score(_centred(x, geometry)).fd > 10 * metric.floor(1440)  # right shapes, always in the middle
    shrunk = torch.nn.functional.interpolate(x, scale_factor=0.5, mode="area")  # half-size shapes, in the top left
    assert metric.score(torch.nn.functional.pad(shrunk, (0, 8, 0, 8), value=-1.0)).fd > 10 * metric.floor(1440)
    circles = x[y == SHAPES_CANVAS_CLASSES.index("circle")]  # one class only
    assert metric.score(circles).fd > 10 * metric.floor(len(circles))


def test_copies_of_training_images_show_in_the_copy_ratio(metric):
    x, y, _ = make_shapes_canvas("train")
    score = metric.score(x, y)
    assert score.num_given == 20_000 and score.num_images == metric.max_images == 1440
    assert score.copy_ratio < 0.05 and score.accuracy > 0.6


def test_the_judge_file_is_written_once_and_read_back(tmp_path, monkeypatch):
    import diffit_toolkit.eval.shapes_canvas as judge_module

    x = make_shapes_canvas("reference")[0][:8]
    monkeypatch.setattr(judge_module, "_MEMO", {})
    monkeypatch.setattr(judge_module, "train_shapes_canvas_classifier",
                        lambda seed: train_shapes_canvas_classifier(seed, epochs=1, num=256))
    first = load_shapes_canvas_classifier(seed=3, cache=tmp_path / "judge.pt")
    monkeypatch.setattr(judge_module, "_MEMO", {})
    monkeypatch.setattr(judge_module, "train_shapes_canvas_classifier", lambda seed: pytest.fail("trained again"))
    again = load_shapes_canvas_classifier(seed=3, cache=tmp_path / "judge.pt")
    assert torch.equal(first.features(x), again.features(x))
    with pytest.raises(ValueError, match="16x16 gray"):
        ShapesCanvasMetric(classifier=first).score(torch.zeros(4, 1, 8, 8))


def test_the_ablation_and_eval_pick_this_judge_for_the_kind(tmp_path, monkeypatch):
    import math

    import diffit_toolkit.eval.shapes_canvas as judge_module
    from diffit_toolkit.commands.eval import _offline_metric, _offline_metric_class
    from diffit_toolkit.eval.ablation import judge_for

    monkeypatch.setattr(judge_module, "_MEMO", {})
    monkeypatch.setattr(judge_module, "train_shapes_canvas_classifier",
                        lambda seed: train_shapes_canvas_classifier(seed, epochs=1, num=256))
    name, judge, held_out = judge_for({"kind": "shapes_canvas"}, tmp_path)
    assert name == "shapes_canvas" and (tmp_path / judge_module.JUDGE_FILE).is_file() and 0 <= held_out <= 1
    row = judge(make_shapes_canvas("floor")[0][:50], None)
    assert row["num_images"] == 50 and math.isnan(row["accuracy"]) and row["fd"] >= 0 and row["floor"] > 0
    facts = {"channels": 1, "resolution": 16, "num_classes": 0}
    assert _offline_metric(facts, "shapes_canvas") == "shapes_canvas" and _offline_metric(facts) == "digits_canvas"
    assert _offline_metric_class("shapes_canvas") is ShapesCanvasMetric
