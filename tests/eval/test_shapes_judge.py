"""The offline shapes judge: real held-out shapes score at the real-vs-real floor, broken ones far worse, copies show."""

from __future__ import annotations

import pytest
import torch

from diffit_toolkit.data.shapes import make_shapes
from diffit_toolkit.eval.shapes import ShapesMetric, to_shapes_tensor, train_shapes_classifier


@pytest.fixture(scope="module")
def metric():
    # a judge trained on 1000 images for 4 epochs (the shipped one: 10 000 images, 10 epochs)
    # the copy check searches the same 1000 images (the shipped one: the whole train split)
    return ShapesMetric(classifier=train_shapes_classifier(seed=0, epochs=4, num=1000, batch=32), num_test=300,
                        num_train=1000)


def test_judge_recognises_held_out_shapes(metric):
    # well above chance (0.1) after a few seconds of training; the shipped judge reaches 98 %
    assert metric.test_accuracy() > 0.15


def test_real_shapes_score_near_the_floor_and_noise_far_above(metric):
    x, y = make_shapes("train", num=1300)
    x, y = x[1000:], y[1000:]  # 300 real images the judge never saw
    real = metric.score(x, y)
    assert real.floor == pytest.approx(metric.floor(300))
    assert real.fd < 1.5 * real.floor
    assert 0.8 < real.copy_ratio < 1.25
    copies = metric.score(*make_shapes("train", num=300))  # training images reproduced: the copy check shows it
    assert copies.copy_ratio < 0.05
    noisy = metric.score((x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1), y)
    assert noisy.fd > 3 * real.floor
    shuffled = metric.score(x, y.roll(1))
    assert shuffled.accuracy < real.accuracy


def test_floor_uses_a_third_stream_the_judge_never_saw(metric):
    floor_x, _ = make_shapes("floor", num=300)
    for other in (make_shapes("test", num=300)[0], make_shapes("train", num=1000)[0]):
        assert torch.cdist(floor_x.flatten(1), other.flatten(1)).min() > 1.0
    assert metric.max_images == 300
    with pytest.raises(ValueError, match="floor set holds 300 images"):
        metric.floor(301)


def test_input_layouts_and_errors():
    x, _ = make_shapes("test", num=2)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # NHWC as in an ADM .npz
    assert torch.allclose(to_shapes_tensor(u8), x, atol=1 / 127)
    with pytest.raises(ValueError, match="32x32 RGB"):
        to_shapes_tensor(torch.zeros(2, 1, 8, 8))
