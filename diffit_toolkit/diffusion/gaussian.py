"""Discrete Gaussian diffusion with the semantics of ADM and DiT (``gaussian_diffusion.py``).

A model is any callable ``model(x, t, y) -> output`` where ``x`` is ``(B, C, ...)``, ``t`` is the
*original* integer timestep (0..999 for a 1000-step process) of shape ``(B,)``, and ``y`` the
labels or ``None``. With a learned variance the model returns ``2C`` channels: the mean
parametrisation (epsilon, x0 or v) then the variance values.

References: Ho et al. (2020) "DDPM"; Nichol & Dhariwal (2021) "Improved DDPM" (learned range,
hybrid loss); Salimans & Ho (2022) (v prediction); Peebles & Xie (2023) "DiT".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch

from diffit_toolkit.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from diffit_toolkit.diffusion.schedules import (
    NUM_TRAIN_TIMESTEPS,
    get_named_beta_schedule,
    space_timesteps,
)

Model = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""A network ``model(x, t, y) -> output``."""

ModelMeanType = Literal["epsilon", "x0", "v"]
ModelVarType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
LossType = Literal["mse", "rescaled_mse", "kl", "rescaled_kl"]

MODEL_MEAN_TYPES: tuple[str, ...] = get_args(ModelMeanType)
MODEL_VAR_TYPES: tuple[str, ...] = get_args(ModelVarType)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
LEARNED_VAR_TYPES = ("learned", "learned_range")


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values are {', '.join(valid)}.")


def min_snr_weight(alphas_cumprod: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023) of each step, for a model predicting
    ``prediction`` (``"epsilon"``, ``"x0"`` or ``"v"``).

    Each weight makes the step's loss equal ``min(SNR, gamma) * |x0 - x0_hat|^2`` with
    ``SNR = abar / (1 - abar)``: ``min(SNR, gamma) / SNR`` for epsilon, ``min(SNR, gamma)`` for x0
    and ``min(SNR, gamma) / (SNR + 1)`` for v prediction.
    """
    if not gamma > 0:
        raise ValueError(f"the min-SNR gamma must be > 0, got {gamma}")
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1)
    raise ValueError(f"unknown prediction '{prediction}' (valid: epsilon, x0, v)")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: ``(B, ...) -> (B,)``."""
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    """ADM / DiT Gaussian diffusion: forward process, posterior, model reverse step and losses.

    All schedule arrays are float64 and indexed by the (possibly respaced) step index
    ``0..num_timesteps-1``; the model is always called with the original timestep through
    `timestep_map`, as ADM's ``_WrappedModel`` does.

    Args:
        betas: float64 ``(T,)`` betas of this process.
        model_mean_type: What the model's first ``C`` channels predict: ``"epsilon"``, ``"x0"``
            or ``"v"`` (``v = sqrt(abar) eps - sqrt(1 - abar) x0``).
        model_var_type: ``"fixed_small"`` (posterior variance), ``"fixed_large"`` (betas),
            ``"learned"`` (log variance) or ``"learned_range"`` (interpolation value in [-1, 1]).
        loss_type: ``"mse"`` (plus the VLB term when the variance is learned, the hybrid loss),
            ``"rescaled_mse"`` (VLB term scaled by ``T / 1000``), ``"kl"`` or ``"rescaled_kl"``.
        timestep_map: Original timestep of each step (identity when ``None``).
    """

    def __init__(
        self,
        betas: torch.Tensor,
        model_mean_type: ModelMeanType = "epsilon",
        model_var_type: ModelVarType = "learned_range",
        loss_type: LossType = "mse",
        timestep_map: torch.Tensor | None = None,
    ) -> None:
        _check_choice("model_mean_type", model_mean_type, MODEL_MEAN_TYPES)
        _check_choice("model_var_type", model_var_type, MODEL_VAR_TYPES)
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]; build them with get_named_beta_schedule.")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long)
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError(
                f"timestep_map must have one entry per step ({self.num_timesteps}), "
                f"got shape {tuple(self.timestep_map.shape)}."
            )

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], torch.zeros(1, dtype=torch.float64)])
        # q(x_t | x_0) (Ho et al., eq. 4)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # q(x_{t-1} | x_t, x_0) (Ho et al., eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; the log is clipped to the t = 1 value (ADM).
        # the variance at t = 0 is 0; the second entry stands in for it (one step: beta_0)
        first = self.posterior_variance[1:2] if self.num_timesteps > 1 else self.betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self._first_variance = first
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_schedule(
        cls,
        schedule: str = "linear",
        num_timesteps: int = NUM_TRAIN_TIMESTEPS,
        model_mean_type: ModelMeanType = "epsilon",
        model_var_type: ModelVarType = "learned_range",
        loss_type: LossType = "mse",
    ) -> GaussianDiffusion:
        """Build from a named beta schedule (``"linear"`` or ``"cosine"``)."""
        return cls(
            get_named_beta_schedule(schedule, num_timesteps),
            model_mean_type=model_mean_type,
            model_var_type=model_var_type,
            loss_type=loss_type,
        )

    def respace(self, section_counts: int | str | Sequence[int]) -> GaussianDiffusion:
        """Return a process that keeps a subset of the steps (ADM's ``SpacedDiffusion``).

        The kept steps have exactly this process's ``alphas_cumprod``; the new betas are
        ``1 - abar_k / abar_{k-1}`` between kept steps. The model is still called with the
        original timestep indices.

        Args:
            section_counts: As in
                [`space_timesteps`][diffit_toolkit.diffusion.schedules.space_timesteps], e.g.
                ``250`` or ``"ddim50"``, or
                ``"logsnrN"``: N steps uniform in log-SNR (what DPM-Solver++ likes).

        Returns:
            A new [`GaussianDiffusion`][diffit_toolkit.diffusion.gaussian.GaussianDiffusion] with
            ``len(kept)`` steps.
        """
        if isinstance(section_counts, str) and section_counts.startswith("logsnr"):
            kept = self._logsnr_timesteps(int(section_counts[len("logsnr") :]))
        else:
            kept = space_timesteps(self.num_timesteps, section_counts)
        return self.respace_to(kept)

    def _logsnr_timesteps(self, num_steps: int) -> list[int]:
        """``num_steps`` distinct steps whose log-SNR is as close to uniformly spaced as possible."""
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(
                f"cannot respace {self.num_timesteps} steps to {num_steps}; choose between 1 and {self.num_timesteps}."
            )
        log_snr = torch.log(self.alphas_cumprod / (1 - self.alphas_cumprod))  # decreasing in t
        targets = torch.linspace(float(log_snr[0]), float(log_snr[-1]), num_steps, dtype=torch.float64)
        idx = [int((log_snr - v).abs().argmin()) for v in targets]
        for j in range(1, num_steps):  # make the indices strictly increasing and in range
            idx[j] = max(idx[j], idx[j - 1] + 1)
        idx[-1] = min(idx[-1], self.num_timesteps - 1)
        for j in range(num_steps - 2, -1, -1):
            idx[j] = min(idx[j], idx[j + 1] - 1)
        return idx

    def respace_to(self, timesteps: Sequence[int]) -> GaussianDiffusion:
        """Return a process that keeps exactly the given steps (of this process) in increasing order.

        Args:
            timesteps: Distinct step indices in ``[0, num_timesteps)``.

        Returns:
            A new [`GaussianDiffusion`][diffit_toolkit.diffusion.gaussian.GaussianDiffusion] with
            ``len(timesteps)`` steps and the same
            ``alphas_cumprod`` at them.
        """
        kept = sorted(set(int(k) for k in timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must be non-empty and lie in [0, {self.num_timesteps}).")
        abar = self.alphas_cumprod[kept]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return GaussianDiffusion(
            1.0 - abar / abar_prev,
            model_mean_type=self.model_mean_type,
            model_var_type=self.model_var_type,
            loss_type=self.loss_type,
            timestep_map=self.timestep_map[kept],
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _extract(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``arr[t]`` reshaped to ``(B, 1, ..., 1)`` for broadcasting against ``like``."""
        out = arr[t.detach().long().cpu()].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps (what the model sees) of step indices ``t``: ``(B,) -> (B,)``."""
        return self.timestep_map[t.detach().long().cpu()].to(t.device)

    @property
    def learns_variance(self) -> bool:
        """Whether the model outputs ``2C`` channels (mean then variance values)."""
        return self.model_var_type in LEARNED_VAR_TYPES

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of ``q(x_t | x_0)`` (Ho et al., eq. 4)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start).expand_as(x_start)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Draw ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`` (Ho et al., eq. 4)."""
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}.")
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of ``q(x_{t-1} | x_t, x_0)`` (Ho et al., eq. 7)."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parametrisations
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """``eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)``."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start
        ) / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def predict_xstart_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``x_0 = sqrt(abar) x_t - sqrt(1 - abar) v`` (Salimans & Ho, 2022, sec. 4)."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def v_target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` (Salimans & Ho, 2022, sec. 4)."""
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * noise
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def learned_range_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log var = frac * log beta_t + (1 - frac) * log beta~_t``, ``frac = (v + 1) / 2``.

        Nichol & Dhariwal (2021), eq. 15.
        """
        min_log = self._extract(self.posterior_log_variance_clipped, t, var_values)
        max_log = self._extract(torch.log(self.betas), t, var_values)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        clip_denoised: bool = False,
        model_output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Apply the model and return ``p(x_{t-1} | x_t)``'s mean, variance and the x_0 estimate.

        Args:
            model: ``model(x, t_original, y)``.
            x: ``(B, C, ...)`` samples at step ``t``.
            t: ``(B,)`` step indices of this process.
            y: Labels passed through to the model.
            clip_denoised: Clip the x_0 estimate to [-1, 1] (pixel space; DiT latents: False).
            model_output: Use this output instead of calling the model (for the VLB term).

        Returns:
            Dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart``, ``eps``,
            ``model_output``.
        """
        channels = x.shape[1]
        if model_output is None:
            model_output = model(x, self.model_timesteps(t), y)
        if self.learns_variance:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"model_var_type {self.model_var_type!r} needs 2*C = {2 * channels} output "
                    f"channels, got {model_output.shape[1]}; set learn_sigma on the model."
                )
            mean_output, var_values = model_output.split(channels, dim=1)
            if self.model_var_type == "learned":
                log_variance = var_values
            else:
                log_variance = self.learned_range_log_variance(var_values, t)
            variance = torch.exp(log_variance)
        else:
            if model_output.shape[1] != channels:
                raise ValueError(
                    f"model_var_type {self.model_var_type!r} needs C = {channels} output channels, "
                    f"got {model_output.shape[1]}; use a learned variance type for 2C outputs."
                )
            mean_output = model_output
            if self.model_var_type == "fixed_large":
                # ADM: beta_t, with the first entry replaced to get a good decoder log-likelihood.
                fixed = torch.cat([self._first_variance, self.betas[1:]])
                variance = self._extract(fixed, t, x).expand_as(x)
                log_variance = self._extract(torch.log(fixed), t, x).expand_as(x)
            else:
                variance = self._extract(self.posterior_variance, t, x).expand_as(x)
                log_variance = self._extract(self.posterior_log_variance_clipped, t, x).expand_as(x)

        if self.model_mean_type == "epsilon":
            pred_xstart = self.predict_xstart_from_eps(x, t, mean_output)
        elif self.model_mean_type == "x0":
            pred_xstart = mean_output
        else:
            pred_xstart = self.predict_xstart_from_v(x, t, mean_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        eps = self.predict_eps_from_xstart(x, t, pred_xstart)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
            "model_output": model_output,
        }

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        clip_denoised: bool = False,
        model_output: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound, in bits per dimension (Ho et al., eq. 5).

        ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the discretised
        decoder NLL ``-log p(x_0 | x_1)`` at ``t = 0``.

        Returns:
            Dict with ``output`` ``(B,)`` and ``pred_xstart``.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, y, clip_denoised, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -mean_flat(
            discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        ) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample training loss; with a learned variance the hybrid loss ``mse + vb``.

        As ADM/DiT, the VLB term sees the mean output with a stop-gradient so it only trains the
        variance (Nichol & Dhariwal, 2021, sec. 3.1).

        Args:
            model: ``model(x, t_original, y)``.
            x_start: ``(B, C, ...)`` clean data.
            t: ``(B,)`` step indices.
            y: Labels.
            noise: The epsilon to use; drawn with ``generator`` when ``None``.
            generator: Randomness for ``noise``.

        Returns:
            Dict with ``loss`` ``(B,)`` and, by loss type, ``mse`` and ``vb`` ``(B,)``.
        """
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        terms: dict[str, torch.Tensor] = {}
        if self.loss_type in ("kl", "rescaled_kl"):
            terms["loss"] = self.vb_terms_bpd(model, x_start, x_t, t, y)["output"]
            if self.loss_type == "rescaled_kl":
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, self.model_timesteps(t), y)
        channels = x_t.shape[1]
        if self.learns_variance:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"learned variance needs 2*C = {2 * channels} output channels, got {model_output.shape[1]}."
                )
            mean_output, var_values = model_output.split(channels, dim=1)
            frozen = torch.cat([mean_output.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(model, x_start, x_t, t, y, model_output=frozen)["output"]
            if self.loss_type == "rescaled_mse":
                # ADM: divide by 1000 for equivalence with the initial VLB implementation.
                terms["vb"] = terms["vb"] * (self.num_timesteps / NUM_TRAIN_TIMESTEPS)
        else:
            mean_output = model_output
        if self.model_mean_type == "epsilon":
            target = noise
        elif self.model_mean_type == "x0":
            target = x_start
        else:
            target = self.v_target(x_start, t, noise)
        terms["mse"] = mean_flat((target - mean_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Uniform training step indices ``(B,)`` (DiT samples t uniformly)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)


def create_gaussian_diffusion(
    timestep_respacing: int | str | Sequence[int] | None = None,
    noise_schedule: str = "linear",
    num_timesteps: int = NUM_TRAIN_TIMESTEPS,
    model_mean_type: ModelMeanType = "epsilon",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    rescale_learned_sigmas: bool = False,
) -> GaussianDiffusion:
    """Build the diffusion DiT uses (its ``create_diffusion``), optionally respaced.

    Args:
        timestep_respacing: ``None`` / ``""`` for all steps, else e.g. ``250`` or ``"ddim50"``.
        noise_schedule: ``"linear"`` or ``"cosine"``.
        num_timesteps: Training steps (1000).
        model_mean_type: ``"epsilon"``, ``"x0"`` or ``"v"``.
        learn_sigma: Learned-range variance (2C outputs) with the hybrid loss.
        sigma_small: With a fixed variance, use the posterior variance instead of beta.
        rescale_learned_sigmas: Scale the VLB term by ``T / 1000`` (ADM's ``rescaled_mse``).

    Returns:
        The (respaced) [`GaussianDiffusion`][diffit_toolkit.diffusion.gaussian.GaussianDiffusion].
    """
    if learn_sigma:
        var_type: ModelVarType = "learned_range"
    else:
        var_type = "fixed_small" if sigma_small else "fixed_large"
    diffusion = GaussianDiffusion.from_schedule(
        noise_schedule,
        num_timesteps,
        model_mean_type=model_mean_type,
        model_var_type=var_type,
        loss_type="rescaled_mse" if rescale_learned_sigmas else "mse",
    )
    if timestep_respacing in (None, ""):
        return diffusion
    return diffusion.respace(timestep_respacing)
