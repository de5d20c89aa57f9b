"""A test plugin: the Gaussian process with each sample's timestep and noise a function of the
sample itself, so a batch's loss does not depend on how the batch is split (micro-batches,
processes). Loaded by path (``DIFFIT_TOOLKIT_PLUGINS``) in-process and in torchrun workers."""

import torch

from diffit_plugins.processes import GaussianProcess, gaussian_ddim
from diffit_toolkit.hookspecs import hookimpl


class PerSampleNoiseProcess(GaussianProcess):
    def loss(self, model, x0, y, generator):
        flat = x0.flatten(1)
        t = (flat.abs().sum(1) * 7919).long() % self.config.num_timesteps
        noise = torch.sin(x0 * 12.9898 + t.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype) * 0.731)
        return self.gaussian.training_losses(model, x0, t, y, noise=noise)["loss"]


@hookimpl
def diffit_register(registrar):
    registrar.add("process", "per_sample_noise", PerSampleNoiseProcess)
    registrar.add("sampler", "per_sample_noise.ddim", gaussian_ddim)  # the grids at the end of a run
