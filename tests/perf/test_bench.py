"""``diffit-toolkit bench`` on CPU: a tiny preset end to end, the JSON structure, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffit_toolkit.bench import BenchConfig, device_peak_tflops
from diffit_toolkit.cli import app

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--preset", "S/8", "--set", "input_size=16", "--set", "depth=2", "--batch-size", "2",
        "--warmup", "1", "--iters", "2", "--sample-steps", "2", "--sample-batch", "2"]


def _numbers(value, path="report"):
    """Every (path, number) in a nested report (bools are flags, not numbers)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = CliRunner().invoke(app, ["bench", *TINY, "--backend", "math", "--backend", "sdpa", "--backend", "flex",
                                      "--attention-shape", "1,2,16,32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "training step" in result.output and "DiffiT / DiT" in result.output
    return json.loads(out.read_text())


def test_report_structure(report: dict) -> None:
    assert set(report) == {"meta", "train", "attention", "sampling", "comparison"}
    rows = {(r["model"], r["backend"], r["compile"]) for r in report["train"]}
    assert rows == {("latent_diffit:S/8", "math", False), ("latent_diffit:S/8", "sdpa", False), ("dit:S/8", "auto", False)}
    mechanisms = {r["model"]: r["mechanism"] for r in report["train"]}
    assert mechanisms == {"latent_diffit:S/8": "tmsa", "dit:S/8": "adaln_zero"}
    assert {(r["backend"], r["bias"]) for r in report["attention"]} == {("math", "dense"), ("sdpa", "dense"), ("sdpa", "none")}
    assert [r["mechanism"] for r in report["sampling"]] == ["tmsa", "adaln_zero"]
    assert all(r["guided"] and r["steps"] == 2 for r in report["sampling"])
    assert report["meta"]["device"] == "cpu" and report["meta"]["peak_tflops"] is None
    # flex has no CPU backward: skipped with its reason instead of a row that silently ran sdpa
    assert [s["backend"] for s in report["meta"]["skipped_backends"]] == ["flex"]
    assert all(r["mfu"] is None for r in report["train"])  # CPU: no peak, MFU n/a
    assert all(r["peak_memory_kind"] == "process_rss_high_water" for r in report["train"])


def test_every_number_is_positive_and_finite(report: dict) -> None:
    numbers = list(_numbers({k: report[k] for k in ("train", "attention", "sampling", "comparison")}))
    assert len(numbers) > 30
    bad = [(path, value) for path, value in numbers if not (math.isfinite(value) and value > 0)]
    assert not bad, bad
    reference = [r for r in report["attention"] if r["bias"] == "none"][0]
    assert reference["ratio_to_reference"] == 1.0
    for row in report["train"]:
        assert row["img_per_s"] == pytest.approx(row["batch_size"] / (row["step_ms"] / 1e3))
        assert row["tflops"] == pytest.approx(3 * row["gflops_fwd_per_image"] * row["img_per_s"] / 1e3)


def test_recipe_without_dit(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench", "--recipe", str(ROOT / "recipes" / "quickstart.yaml"), "--device", "cpu",
                                      "--backend", "sdpa", "--batch-size", "2", "--iters", "1", "--warmup", "0",
                                      "--sample-steps", "2", "--sample-batch", "2", "--attention-shape", "off",
                                      "--no-compare-dit", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["comparison"] is None and data["attention"] == []
    assert data["meta"]["model"]["label"] == "quickstart"
    assert data["sampling"][0]["sampler"] == "heun"  # the recipe's sampler


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "nope"], "unknown attention backend 'nope'"),
        (["--attention-shape", "1,2,3"], "B,H,N,d"),
        (["--compile", "maybe"], "off, on or both"),
        (["--precision", "fp8"], "precision must be one of"),
        (["--set", "depth"], "key=value"),
    ],
)
def test_bad_input_is_a_one_line_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", *TINY, *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_peak_table() -> None:
    import torch

    assert device_peak_tflops(torch.device("cpu"), "bf16") is None
    assert device_peak_tflops(torch.device("cpu"), "bf16", 100.0) == 100.0
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        BenchConfig(batch_size=0)


def test_bench_times_the_trainers_own_step(monkeypatch) -> None:
    """The training rows time ``Trainer.train_step``, the step ``train`` runs (EMA, clipping,
    scaler and schedule included), not a step of its own."""
    from diffit_toolkit.bench import harness
    from diffit_toolkit.train.trainer import Trainer

    calls = []
    step = Trainer.train_step

    def counted(self, x, y):
        stats = step(self, x, y)
        calls.append((tuple(x.shape), stats.applied, int(self.ema.n_averaged)))
        return stats

    monkeypatch.setattr(Trainer, "train_step", counted)
    config = BenchConfig(preset="S/8", model_options={"input_size": 16, "depth": 1}, batch_size=2, warmup=1, iters=2,
                         device="cpu", compare_dit=False, attention_shape=None)
    spec, _ = harness._model_specs(config)
    row = harness.train_step_bench(spec, config, harness.torch.device("cpu"), None, False, None)
    assert [c[0] for c in calls] == [(2, 4, 16, 16)] * 3 and all(c[1] for c in calls)
    assert [c[2] for c in calls] == [1, 2, 3]  # the EMA is updated on every timed step
    assert row["img_per_s"] > 0
