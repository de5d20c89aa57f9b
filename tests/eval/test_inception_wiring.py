"""The Inception path end to end with a *random* weights file of the right format.

The real ``weights-inception-2015-12-05-6726825d.pth`` cannot be downloaded here; a randomly
initialised state dict with the same keys checks the wiring (local file -> torch-fidelity extractor
-> metrics -> CLI), not the numbers.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffit_toolkit.cli import app
from diffit_toolkit.inference.writers import save_npz


def _random_inception_weights(path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m, torch.device("meta"):  # shapes only: no slow initialisation
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in net.state_dict().items():
        if not t.is_floating_point():
            state[name] = torch.zeros(t.shape, dtype=t.dtype)
        elif "running_var" in name:
            state[name] = torch.ones(t.shape)
        elif "running_mean" in name or name.endswith("bias"):
            state[name] = torch.zeros(t.shape)
        else:
            fan_in = max(1, t[0].numel()) if t.dim() > 1 else 1
            state[name] = torch.randn(t.shape, generator=gen) / fan_in**0.5
    torch.save(state, path)


@pytest.mark.slow
def test_eval_with_a_local_weights_file(tmp_path, monkeypatch):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    _random_inception_weights(weights, monkeypatch)
    gen = torch.Generator().manual_seed(0)
    save_npz(torch.rand(5, 3, 16, 16, generator=gen) * 2 - 1, None, tmp_path / "a.npz")
    save_npz(torch.rand(5, 3, 16, 16, generator=gen) * 2 - 1, None, tmp_path / "b.npz")
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"),
                                      "--inception-weights", str(weights), "--kid-subset-size", "4",
                                      "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "m.json").read_text())
    assert {"fid", "kid_mean", "is_mean", "precision", "recall"} <= set(numbers)
    assert numbers["fid"] >= 0 and numbers["num_samples"] == 5
    from diffit_toolkit.eval.metrics import inception_extractor

    seen = []
    inception_extractor(weights, batch_size=2, progress=lambda *a: seen.append(a))(torch.zeros(5, 3, 16, 16, dtype=torch.uint8))
    assert seen == [(2, 5, "Inception features"), (4, 5, "Inception features"), (5, 5, "Inception features")]
