"""A trained toolkit DiT as a complete diffusers ``DiTPipeline`` folder.

The folder holds what ``DiTPipeline.from_pretrained(folder)`` loads with no other argument:

| part | what it is |
| --- | --- |
| `transformer/` | the DiT as a ``DiTTransformer2DModel`` ([`save_diffusers_dit`][diffit_toolkit.interop.diffusers_dit.save_diffusers_dit]) |
| `scheduler/` | the scheduler of the recipe's sampler, configured as ``diffit-toolkit sample --sampler diffusers:<Class>`` builds it: training schedule, prediction type, clipping |
| `vae/` | the ``AutoencoderKL`` that decodes the latents, its ``scaling_factor`` set to the run's latent scale |
| `model_index.json` | the pipeline's parts and, when the data named its classes, ``id2label`` |

Only the Gaussian process has a diffusers scheduler that drives the network the way the toolkit
does (the network's input is the noisy latent, its time the training step index): EDM
preconditioning wraps the network in ``c_in, c_skip, c_out, c_noise`` and flow models predict a
velocity on another time axis, which ``DiTPipeline`` cannot apply, so those are refused.

Where ``DiTPipeline`` samples differently from ``diffit-toolkit sample`` (guided channels, the
null class, guidance schedules, stochastic steps, ...) is listed by
[`pipeline_differences`][diffit_toolkit.interop.diffusers_pipeline.pipeline_differences] and
written into the folder's model card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffit_toolkit.interop.diffusers_dit import DIFFUSERS_PIPELINE_INDEX, save_diffusers_dit, to_diffusers_dit

#: The null class ``DiTPipeline`` labels the unconditional half of a guided batch with (ImageNet's 1000).
DITPIPELINE_NULL_CLASS = 1000
#: The diffusers scheduler of each of the toolkit's own Gaussian samplers.
SAMPLER_SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm_solver++": "DPMSolverMultistepScheduler"}
#: Why a process other than the Gaussian one has no ``DiTPipeline``.
_NOT_SAMPLED_BY_DIFFUSERS = {
    "edm": "the network is wrapped in EDM preconditioning (c_in, c_skip, c_out, c_noise), which DiTPipeline "
           "does not apply",
    "flow": "the network predicts a flow velocity on the flow time axis, which DiTPipeline's schedulers do not "
            "integrate",
}
#: Schedulers whose ``step`` draws random numbers (DDIM only with ``eta > 0``).
_STOCHASTIC = ("DDPMScheduler", "DDPMParallelScheduler", "EulerAncestralDiscreteScheduler",
               "KDPM2AncestralDiscreteScheduler")


def scheduler_name(sampler: str) -> str:
    """The diffusers scheduler class for the recipe's ``sample.sampler``."""
    if sampler.startswith("diffusers:"):
        return sampler.split(":", 1)[1]
    if sampler not in SAMPLER_SCHEDULERS:
        raise ValueError(f"the sampler '{sampler}' has no diffusers scheduler (one of {', '.join(SAMPLER_SCHEDULERS)} "
                         f"or diffusers:<SchedulerClass> has)")
    return SAMPLER_SCHEDULERS[sampler]


def check_pipeline_process(process: str) -> None:
    """Refuse, in one line, a run of a process that ``DiTPipeline`` cannot sample the way the toolkit does."""
    if process == "gaussian":
        return
    why = _NOT_SAMPLED_BY_DIFFUSERS.get(process, "only the gaussian process has a diffusers scheduler")
    raise ValueError(f"cannot export a run of the {process} process as a diffusers DiTPipeline: {why}; export it without "
                     f"--diffusers-pipeline and sample it with diffit-toolkit")


def pipeline_scheduler(process: Any, sample: Any) -> Any:
    """The diffusers scheduler of the sampler ``sample.sampler`` for ``process`` (the run's built
    process), configured as ``diffit-toolkit sample
    --sampler diffusers:<Class>`` builds it (training schedule, prediction type, clipping), except
    that a learned variance is not used: ``DiTPipeline`` passes the scheduler the predicted noise
    only.

    Raises:
        ValueError: one line for a process other than Gaussian, an unknown scheduler, or one whose
            initial noise is not standard normal (``DiTPipeline`` does not scale it by
            ``init_noise_sigma``).
    """
    check_pipeline_process(process.name)
    make = getattr(process, "diffusers_scheduler", None)  # the scheduler the toolkit's own bridge samples with
    if make is None:
        raise ValueError(f"the {process.name} process builds no diffusers scheduler; export it without "
                         f"--diffusers-pipeline and sample it with diffit-toolkit")
    name = scheduler_name(sample.sampler)
    scheduler = make(name, sample.clip_denoised)
    if getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range"):
        scheduler = type(scheduler).from_config(scheduler.config, variance_type="fixed_small")
    scheduler.set_timesteps(sample.steps)
    if float(scheduler.init_noise_sigma) != 1.0:
        raise ValueError(f"the recipe samples with {name}, whose initial noise is scaled by {float(scheduler.init_noise_sigma):.4g}, "
                         f"which DiTPipeline does not do: choose a DDPM, DDIM or DPM-Solver scheduler in sample.sampler")
    return type(scheduler).from_config(scheduler.config)  # a fresh one: no timesteps set


def pipeline_differences(sample: Any, facts: dict[str, Any], out_channels: int, scheduler: str) -> list[str]:
    """Where ``DiTPipeline`` on the exported folder samples differently from ``diffit-toolkit sample``
    with the settings ``sample`` (the recipe's sample section), one sentence each (for the model card)."""
    channels = int(facts["channels"])
    num_classes = int(facts.get("num_classes") or 0)
    lines = []
    guided = sample.guided_channels
    if guided is not None and guided < channels:
        lines.append(f"Guided channels: the toolkit guides the first {guided} of the {channels} latent channels "
                     f"(sample.guided_channels: {guided}); DiTPipeline guides all {channels}, so guided images differ. "
                     f"`diffit-toolkit sample --guided-channels {channels}` samples as DiTPipeline does.")
    else:
        lines.append(f"Guided channels: both guide all {channels} latent channels.")
    if num_classes != DITPIPELINE_NULL_CLASS:
        lines.append(f"Null class: DiTPipeline labels the unconditional half of a guided batch with class "
                     f"{DITPIPELINE_NULL_CLASS}; this model has {num_classes} classes (its null class is {num_classes}), "
                     f"so any guidance_scale above 1 fails inside diffusers (index out of range). Call the pipeline "
                     f"with guidance_scale=1, or sample with guidance in diffit-toolkit.")
    else:
        lines.append(f"Null class: {DITPIPELINE_NULL_CLASS} in both.")
    lines.append(f"Defaults: DiTPipeline samples 50 steps at guidance scale 4 unless told; the recipe samples "
                 f"{sample.steps} steps at guidance scale {sample.guidance_scale:g} (pass num_inference_steps and "
                 f"guidance_scale). DiTPipeline guides only when guidance_scale is above 1.")
    if sample.guidance_schedule != "constant" or sample.guidance_interval is not None:
        how = [f"the {sample.guidance_schedule} schedule (power {sample.guidance_power:g})"] \
            if sample.guidance_schedule != "constant" else []
        if sample.guidance_interval is not None:
            how.append(f"only at noise levels {sample.guidance_interval[0]:g} to {sample.guidance_interval[1]:g}")
        lines.append(f"Guidance schedule: the recipe guides with {' and '.join(how)}; DiTPipeline guides with a "
                     f"constant scale at every step.")
    if sample.sampler in SAMPLER_SCHEDULERS:
        lines.append(f"Timesteps: the toolkit's own `{sample.sampler}` sampler places its {sample.steps} steps as ADM "
                     f"does and computes in float64; the pipeline's {scheduler} uses diffusers' step placement. "
                     f"`diffit-toolkit sample --sampler diffusers:{scheduler}` samples with exactly this scheduler.")
    if scheduler in _STOCHASTIC or (scheduler == "DDIMScheduler" and sample.eta > 0):
        lines.append(f"Randomness of the steps: {scheduler} draws noise at every step; DiTPipeline does not pass its "
                     f"generator to the scheduler, so the steps draw from torch's global random state and images "
                     f"are not reproducible per image as in the toolkit (only the initial noise is).")
    if scheduler == "DDIMScheduler" and sample.eta > 0:
        lines.append(f"DDIM eta: the recipe samples with eta {sample.eta:g}; DiTPipeline calls the scheduler with "
                     f"its default eta 0.")
    if sample.clip_denoised and scheduler == "DDIMScheduler":
        lines.append("Clipping: the toolkit re-derives the noise from the clipped x_0 estimate "
                     "(use_clipped_model_output); DiTPipeline does not, so clipped DDIM steps differ.")
    if out_channels == 2 * channels and scheduler in ("DDPMScheduler", "DDPMParallelScheduler"):
        lines.append("Learned variance: DiTPipeline drops the variance channels the model predicts; the "
                     "scheduler steps with its fixed variance, where the toolkit uses the learned one.")
    lines.append("Initial noise: the toolkit draws image i from its own generator seeded with "
                 "`int(numpy.random.SeedSequence([seed, i]).generate_state(1)[0])`; pass DiTPipeline the list of "
                 "these generators (one per image) for the same initial noise.")
    return lines


def id2label(facts: dict[str, Any]) -> dict[str, str] | None:
    """``{"0": name, ...}`` when the data named its classes, else ``None``."""
    names = facts.get("class_names")
    if not names or not facts.get("num_classes"):
        return None
    return {str(i): str(name) for i, name in enumerate(names)}


def check_pipeline(gen: Any, vae: str | None) -> str:
    """Everything ``save_dit_pipeline`` needs, checked before anything is written; returns the VAE
    source (``vae`` or the run's recorded one).

    Raises:
        ValueError: one line: a process diffusers cannot sample, a model that is not a
            class-conditional DiT, a pixel model, or no VAE.
    """
    check_pipeline_process(gen.process.name)
    to_diffusers_dit(gen.model)  # not a diffusers DiT: the reason, in one line
    pipeline_scheduler(gen.process, gen.recipe.sample)
    facts = gen.facts
    latent = facts.get("latent_scale") is not None or bool(facts.get("vae"))
    if not latent:
        raise ValueError(f"DiTPipeline decodes latents with a VAE and this model makes {facts['channels']}-channel "
                         f"pixel images: export it with --diffusers (the transformer alone) instead")
    source = vae or facts.get("vae")
    if not source:
        raise ValueError("the run records no VAE and DiTPipeline decodes its latents with one: pass --vae FOLDER "
                         "(the VAE the latents were encoded with)")
    return str(source)


def save_dit_pipeline(gen: Any, folder: str | Path, vae: str | None = None) -> Path:
    """Write ``gen``'s model as a ``DiTPipeline`` folder (``transformer/``, ``scheduler/``, ``vae/``,
    ``model_index.json``) that ``DiTPipeline.from_pretrained(folder)`` loads as it is.

    Args:
        gen: a loaded [`Pipeline`][diffit_toolkit.inference.pipeline.Pipeline] (weights, recipe, data facts).
        folder: where to write (created).
        vae: the VAE folder or hub id (default: the run's recorded one); its ``scaling_factor``
            is set to the run's latent scale.

    Raises:
        ValueError: one line, as [`check_pipeline`][diffit_toolkit.interop.diffusers_pipeline.check_pipeline],
            or a VAE whose latent channels differ from the model's.
    """
    import diffusers

    from diffit_toolkit.data import load_vae

    source = check_pipeline(gen, vae)
    decoder = load_vae(source, device="cpu")
    channels = int(gen.model.config["in_channels"])
    if int(decoder.config.latent_channels) != channels:
        raise ValueError(f"the VAE {source} makes {decoder.config.latent_channels}-channel latents, the model "
                         f"{channels}-channel ones: pass the VAE the latents were encoded with (--vae FOLDER)")
    scale = gen.facts.get("latent_scale")
    if scale is not None:  # DiTPipeline divides by the VAE's scaling_factor: the run's scale, wherever it came from
        decoder.register_to_config(scaling_factor=float(scale))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_diffusers_dit(gen.model, folder / "transformer")
    scheduler = pipeline_scheduler(gen.process, gen.recipe.sample)
    scheduler.save_pretrained(folder / "scheduler")
    decoder.save_pretrained(folder / "vae")
    index: dict[str, Any] = {
        "_class_name": "DiTPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    labels = id2label(gen.facts)
    if labels is not None:
        index["id2label"] = labels
    (folder / DIFFUSERS_PIPELINE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder
