"""EDM's Heun sampler stays in the noise range a VE / VP preconditioner was trained on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffit_plugins.processes import EDMProcess, edm_heun
from diffit_toolkit.diffusion.edm import EDMPrecond, VEPrecond, VPPrecond, sampling_sigma_range


class _Recorder:
    """A raw network returning zeros and recording the sigmas it is asked about."""

    def __init__(self, precond) -> None:
        self.precond, self.sigmas = precond, []

    def __call__(self, x, c_noise, y=None):
        self.sigmas.append(float(self.precond.sigma_from_c_noise(c_noise.to(torch.float64))[0]))
        return torch.zeros_like(x)


def _process(precond: str) -> EDMProcess:
    return EDMProcess(SimpleNamespace(precond=precond, sigma_data=0.5))


def test_ranges_follow_nvlabs_edm():
    assert sampling_sigma_range(VEPrecond()) == (0.02, 80.0)
    assert sampling_sigma_range(EDMPrecond()) == (0.002, 80.0)
    lo, hi = sampling_sigma_range(VPPrecond())
    assert lo == 0.002 and hi == 80.0 and VPPrecond().sigma_max == pytest.approx(152.0, rel=0.01)
    assert VPPrecond().sigma_min == pytest.approx(0.001, rel=0.01)


@pytest.mark.parametrize(("precond", "lo", "hi"), [("ve", 0.02, 80.0), ("edm", 0.002, 80.0)])
def test_heun_evaluates_inside_the_trained_range(precond, lo, hi):
    process = _process(precond)
    net = _Recorder(process.precond)
    settings = SimpleNamespace(steps=6)
    edm_heun(process, net, torch.randn(2, 3, 1, 1), None, settings, None)
    assert max(net.sigmas) == pytest.approx(hi, rel=1e-5)
    assert min(net.sigmas) == pytest.approx(lo, rel=1e-5)


def test_noise_level_spans_the_clamped_range():
    process = _process("ve")
    c_noise = process.precond.c_noise(torch.tensor([0.02, 80.0], dtype=torch.float64))
    torch.testing.assert_close(process.noise_level(c_noise), torch.tensor([0.0, 1.0], dtype=torch.float64))
