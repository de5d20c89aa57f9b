"""The measurements of ``diffit-toolkit bench``.

Timing: ``warmup`` untimed iterations (they also absorb ``torch.compile``), then ``iters`` timed
ones with ``torch.cuda.synchronize()`` before reading the clock on GPU. FLOPs are
[`count_flops`][diffit_toolkit.backbones.info.count_flops] (2 x multiply-adds of the forward, matrix
products only, as DiT counts them); a training step counts 3 x the forward. MFU is achieved
FLOP/s over the device's dense peak (`PEAK_TFLOPS` or ``peak_tflops``), ``None`` on CPU.
"""

from __future__ import annotations

import contextlib
import math
import platform
import re
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from diffit_toolkit.build import build_model, build_process, load_recipe
from diffit_toolkit.recipe import Recipe, parse_recipe

#: Dense peak TFLOP/s by device-name substring: (bf16/fp16, tf32). H100 SXM and H200 share the
#: same tensor cores; an H100 PCIe is lower (756 bf16), so pass ``peak_tflops`` for it.
PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.4, 494.7),
    "H100": (989.4, 494.7),
    "A100": (312.0, 156.0),
}

#: Model options that define the architecture's size (kept when building the DiT counterpart).
_SIZE_KEYS = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
              "num_classes", "class_dropout_prob", "learn_sigma", "time_features", "frequency_dim")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchConfig:
    """What to benchmark.

    Args:
        recipe: recipe path or name; its ``model``, ``diffusion``, ``train`` (clipping, EMA,
            optimizer) and ``sample`` sections are used.
        backbone: registered backbone when no recipe is given.
        preset: the backbone's preset (e.g. ``XL/2``, ``S/8``).
        mechanism: conditioning mechanism (``None``: the backbone's default).
        model_options: further backbone options (``input_size``, ``depth``, ...), over the recipe's.
        backends: attention backends to train with (``None``: ``auto`` and every backend usable
            for a biased, differentiated call on this device).
        compile_modes: ``False`` eager, ``True`` ``torch.compile`` (each is a row).
        batch_size: training batch.
        warmup: untimed iterations.
        iters: timed iterations.
        precision: ``bf16``, ``fp16`` (autocast on GPU) or ``fp32``.
        device: ``cpu`` or ``cuda`` (``None``: cuda when available).
        peak_tflops: device peak for MFU (``None``: from `PEAK_TFLOPS`, n/a on CPU).
        attention_shape: (B, H, N, d) of the attention microbenchmark (``None``: skip it).
        sampler: sampler of the sampling measurement (``None``: the recipe's, else ``ddpm``).
        sample_steps: sampling steps (``None``: the recipe's, else 250).
        guidance_scale: classifier-free guidance scale (``None``: the recipe's, else 4.0).
        sample_batch: images per sampling batch (guidance doubles the model batch).
        compare_dit: also measure the same-size ``adaln_zero`` (DiT) model.
        seed: seed of weights and inputs.
    """

    recipe: str | None = None
    backbone: str = "latent_diffit"
    preset: str | None = "XL/2"
    mechanism: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    backends: list[str] | None = None
    compile_modes: tuple[bool, ...] = (False,)
    batch_size: int = 64
    warmup: int = 3
    iters: int = 10
    precision: str = "bf16"
    device: str | None = None
    peak_tflops: float | None = None
    attention_shape: tuple[int, int, int, int] | None = (64, 16, 256, 72)
    sampler: str | None = None
    sample_steps: int | None = None
    guidance_scale: float | None = None
    sample_batch: int = 16
    compare_dit: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {', '.join(_DTYPES)}, got '{self.precision}'")
        for name in ("batch_size", "iters", "sample_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.attention_shape is not None and (len(self.attention_shape) != 4 or min(self.attention_shape) < 1):
            raise ValueError(f"attention shape must be 4 positive ints B,H,N,d, got {self.attention_shape}")


# -- small helpers -------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of ``fn`` (mean over ``iters`` after ``warmup``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def device_peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """Dense peak TFLOP/s of ``device`` at ``precision`` (``None`` when unknown or on CPU)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return tf32 if precision == "fp32" else half
    return None


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what it is): CUDA max allocated, or the process's RSS high-water mark on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024), "process_rss_high_water"


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=_DTYPES[precision])
    return contextlib.nullcontext()


def usable_backends(device: torch.device, dtype: torch.dtype, head_dim: int, has_bias: bool = True) -> list[str]:
    """Registered backends that can take a (biased) differentiated call on this device."""
    from diffit_toolkit.registry import attention_backends

    names = []
    for entry in attention_backends.entries():
        backend = entry.obj
        if backend.unavailable_reason() is None and backend.supports(device.type, dtype, has_bias, head_dim, True):
            names.append(entry.name)
    return names


# -- models --------------------------------------------------------------------------------------


@dataclass
class _ModelSpec:
    label: str
    recipe: Recipe

    @property
    def backbone(self) -> str:
        return self.recipe.model.get("backbone", "latent_diffit")


def _model_specs(config: BenchConfig) -> tuple[_ModelSpec, Any]:
    """The model to measure (as a recipe) and its sample section."""
    if config.recipe is not None:
        base = load_recipe(config.recipe)
        model = {**base.model, **config.model_options}
        diffusion, sample, label = base.diffusion.model_dump(), base.sample.model_dump(), base.name
        train = base.train.model_dump()
    else:
        model = {"backbone": config.backbone, "preset": config.preset, **config.model_options}
        diffusion = {"learn_sigma": bool(config.model_options.get("learn_sigma", True))}
        train = {}
        sample = {"sampler": "ddpm", "steps": 250, "guidance_scale": 4.0}
        label = f"{config.backbone}:{config.preset}" if config.preset else config.backbone
    if config.mechanism is not None:
        model["mechanism"] = config.mechanism
    overrides = {k: v for k, v in dict(sampler=config.sampler, steps=config.sample_steps,
                                        guidance_scale=config.guidance_scale).items() if v is not None}
    recipe = parse_recipe({"name": re.sub(r"[^A-Za-z0-9_.+-]", "_", label), "model": model, "diffusion": diffusion, "train": train,
                           "sample": {**sample, **overrides}})
    return _ModelSpec(label, recipe), recipe.sample


def _dit_spec(spec: _ModelSpec) -> _ModelSpec:
    """The same-size DiT: the ``dit`` backbone with the size options of ``spec``."""
    from diffit_toolkit.registry import backbones

    preset = spec.recipe.model.get("preset")
    if preset not in getattr(backbones.get("dit"), "presets", ()):  # a preset DiT does not declare: sizes only
        preset = None
    model = {"backbone": "dit", "preset": preset, **{k: v for k, v in spec.recipe.model.items() if k in _SIZE_KEYS}}
    label = f"dit:{preset}" if preset else "dit"
    return _ModelSpec(label, spec.recipe.model_copy(update={"name": label, "model": model}))


def _build(spec: _ModelSpec, device: torch.device, backend: str | None, seed: int) -> torch.nn.Module:
    model = dict(spec.recipe.model)
    if backend is not None:
        model["attention_backend"] = backend
    torch.manual_seed(seed)
    return build_model(spec.recipe.model_copy(update={"model": model}), device=device)


def _attention_facts(model: torch.nn.Module) -> tuple[int, bool]:
    """(head dim, relative bias?) of the model's first transformer block, asked of the block
    itself (its ``BlockSpec``), whatever the backbone; (64, True) for a model without blocks."""
    from diffit_toolkit.nn.block import DiffiTBlock

    block = next((m for m in model.modules() if isinstance(m, DiffiTBlock)), None)
    if block is None:
        return 64, True
    return block.spec.dim // block.spec.num_heads, bool(block.spec.rel_pos_bias)


def _inputs(model: torch.nn.Module, batch: int, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=g).to(device) if model.num_classes > 0 else None
    return x, y


# -- measurements --------------------------------------------------------------------------------


def train_step_bench(spec: _ModelSpec, config: BenchConfig, device: torch.device, backend: str | None,
                     compiled: bool, peak: float | None) -> dict[str, Any]:
    """img/s, step time, achieved TFLOP/s, MFU and peak memory of one training configuration.

    The timed step is the trainer's own [`train_step`][diffit_toolkit.train.trainer.Trainer.train_step]
    (autocast, gradient scaler, micro-batches, clipping, AdamW, schedule and EMA update) on one
    fixed batch, with the recipe's ``train`` settings and the benchmark's batch, precision and
    compile choice."""
    from diffit_toolkit.backbones.info import count_flops, count_parameters
    from diffit_toolkit.train.distributed import DistEnv
    from diffit_toolkit.train.trainer import Trainer

    model = _build(spec, device, backend, config.seed)
    flops_fwd = count_flops(model, batch_size=1)
    params = count_parameters(model)
    train_section = spec.recipe.train.model_copy(update={
        "batch_size": config.batch_size, "precision": config.precision, "compile": compiled, "seed": config.seed,
        "strategy": "ddp", "grad_accum_steps": 1})
    recipe = spec.recipe.model_copy(update={"train": train_section})
    trainer = Trainer(recipe, DistEnv(rank=0, world_size=1, local_rank=0, device=device), model=model).setup()
    x0, y = _inputs(model, config.batch_size, device, config.seed)

    def step() -> None:
        trainer.train_step(x0, y)

    _reset_peak_memory(device)
    seconds = _time(step, device, config.warmup, config.iters)
    memory, memory_kind = _peak_memory(device)
    train_flops = 3 * flops_fwd * config.batch_size
    tflops = train_flops / seconds / 1e12
    result = {
        "model": spec.label,
        "backbone": spec.backbone,
        "mechanism": model.config.get("mechanism"),
        "backend": backend or "auto",
        "compile": compiled,
        "batch_size": config.batch_size,
        "params": params,
        "gflops_fwd_per_image": flops_fwd / 1e9,
        "step_ms": seconds * 1e3,
        "img_per_s": config.batch_size / seconds,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
    }
    del model, trainer
    return result


def _relative_index(n: int) -> tuple[torch.Tensor, int]:
    """Swin index for ``n`` tokens: a square grid when ``n`` is a square, else a 1 x n strip."""
    from diffit_toolkit.nn.attention import relative_position_index

    side = math.isqrt(n)
    window = (side, side) if side * side == n else (1, n)
    return relative_position_index(window), (2 * window[0] - 1) * (2 * window[1] - 1)


def attention_microbench(shape: tuple[int, int, int, int], device: torch.device, precision: str, warmup: int,
                         iters: int, backends: list[str] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Forward + backward time of each backend at (B, H, N, d) with a relative-position bias.

    Rows: every usable backend with the dense gathered bias (gradient into the table), the
    ``triton`` fused gather when it runs here, and ``sdpa`` without bias (the reference line; the
    others carry ``ratio_to_reference``).
    """
    from diffit_toolkit.registry import attention_backends

    B, H, N, d = shape
    dtype = _DTYPES[precision] if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
    index, T = _relative_index(N)
    index = index.to(device)
    table = (0.02 * torch.randn(T, H, generator=g)).to(device).requires_grad_(True)
    do = torch.randn(B, H, N, d, generator=g).to(device, dtype)
    scale = d**-0.5

    def dense_bias() -> torch.Tensor:
        return table[index.reshape(-1)].reshape(N, N, H).permute(2, 0, 1)[None]

    def timed(call: Callable[[], torch.Tensor]) -> float:
        def fwd_bwd() -> None:
            for t in (q, k, v, table):
                t.grad = None
            call().backward(do)

        return _time(fwd_bwd, device, warmup, iters)

    rows: list[dict[str, Any]] = []
    names = backends if backends is not None else usable_backends(device, dtype, d)
    for name in names:
        backend = attention_backends.get(name)
        if backend.unavailable_reason() is not None or not backend.supports(device.type, dtype, True, d, True):
            continue
        rows.append({"backend": name, "bias": "dense", "ms": 1e3 * timed(lambda b=backend: b.fn(q, k, v, dense_bias(), scale))})
    for entry in attention_backends.entries():  # backends that gather the bias from the table in-kernel
        gathered = getattr(entry.obj, "gathered_fn", None)
        if gathered is not None and (backends is None or entry.name in backends) and entry.obj.unavailable_reason() is None \
                and entry.obj.supports(device.type, dtype, True, d, True):
            rows.append({"backend": entry.name, "bias": "gathered",
                         "ms": 1e3 * timed(lambda fn=gathered: fn(q, k, v, table, index, None, scale))})
    sdpa = attention_backends.get("sdpa").fn
    reference = 1e3 * timed(lambda: sdpa(q, k, v, None, scale))
    rows.append({"backend": "sdpa", "bias": "none", "ms": reference})
    for row in rows:
        row.update(shape=[B, H, N, d], dtype=str(dtype).replace("torch.", ""), ratio_to_reference=row["ms"] / reference)
    return rows


def sampling_bench(spec: _ModelSpec, sample, config: BenchConfig, device: torch.device,
                   backend: str | None) -> dict[str, Any]:
    """Images per second of the recipe's sampler with classifier-free guidance (one timed batch)."""
    model = _build(spec, device, backend, config.seed).eval()
    process = build_process(spec.recipe.model_copy(update={"sample": sample}))
    x, y = _inputs(model, config.sample_batch, device, config.seed)
    noise = torch.randn_like(x)
    warm = sample.model_copy(update={"steps": min(2, sample.steps)})

    def run(section) -> None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
        with torch.inference_mode(), _autocast(device, config.precision):
            process.sample(model, noise, y, section, generator, null_class=model.null_class)

    run(warm)  # warmup (kernels, allocator, autotuning) with a short chain
    seconds = _time(lambda: run(sample), device, 0, 1)
    guided = sample.guidance_scale != 1.0 and model.null_class is not None
    return {
        "model": spec.label,
        "mechanism": model.config.get("mechanism"),
        "backend": backend or "auto",
        "sampler": sample.sampler,
        "steps": sample.steps,
        "guidance_scale": sample.guidance_scale,
        "guided": guided,
        "batch": config.sample_batch,
        "seconds": seconds,
        "img_per_s": config.sample_batch / seconds,
    }


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every measurement of ``config``; returns the JSON-ready report.

    Returns:
        ``{"meta", "train", "attention", "sampling", "comparison"}``: ``train`` one row per
        (model, backend, compile), ``attention`` the microbenchmark rows, ``sampling`` one row per
        model, ``comparison`` DiffiT / DiT ratios of the best rows (``None`` without DiT).
    """
    say = progress or (lambda message: None)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = device_peak_tflops(device, config.precision, config.peak_tflops)
    spec, sample = _model_specs(config)
    dtype = _DTYPES[config.precision] if device.type == "cuda" else torch.float32
    head_dim, has_bias = _attention_facts(_build(spec, torch.device("meta"), None, config.seed))
    backends = config.backends if config.backends is not None else ["auto", *usable_backends(device, dtype, head_dim)]
    from diffit_toolkit.registry import attention_backends

    skipped: list[dict[str, str]] = []
    trainable = []
    for name in backends:  # unknown names fail here with the registry's one-line error
        if name == "auto":
            trainable.append(name)
            continue
        entry = attention_backends.get(name)
        reason = entry.unavailable_reason()
        if reason is None and not entry.supports(device.type, dtype, has_bias, head_dim, True):
            reason = f"cannot train on {device.type} {str(dtype).replace('torch.', '')} at head dim {head_dim}"
        if reason is None:
            trainable.append(name)
        else:  # it would silently fall back to another backend: skip instead of mislabelling a row
            say(f"skip training with '{name}': {reason}")
            skipped.append({"backend": name, "reason": reason})
    if not trainable:
        raise ValueError(f"no requested attention backend can train on {device.type}: {skipped[0]['reason']}")

    train: list[dict[str, Any]] = []
    for backend in trainable:
        for compiled in config.compile_modes:
            say(f"train {spec.label} backend={backend} compile={compiled}")
            train.append(train_step_bench(spec, config, device, backend, compiled, peak))
    dit_spec = _dit_spec(spec) if config.compare_dit else None
    if dit_spec is not None:
        for compiled in config.compile_modes:
            say(f"train {dit_spec.label} backend=auto compile={compiled}")
            train.append(train_step_bench(dit_spec, config, device, "auto", compiled, peak))

    attention: list[dict[str, Any]] = []
    if config.attention_shape is not None:
        say(f"attention microbenchmark {tuple(config.attention_shape)}")
        names = [b for b in backends if b != "auto"] if config.backends is not None else None
        attention = attention_microbench(tuple(config.attention_shape), device, config.precision,
                                         max(1, config.warmup), config.iters, names, config.seed)

    mine = [row for row in train if row["model"] == spec.label]
    best = max(mine, key=lambda row: row["img_per_s"])
    sampling = []
    say(f"sampling {spec.label} {sample.sampler} x{sample.steps}")
    sampling.append(sampling_bench(spec, sample, config, device, best["backend"]))
    comparison = None
    if dit_spec is not None:
        say(f"sampling {dit_spec.label}")
        sampling.append(sampling_bench(dit_spec, sample, config, device, "auto"))
        dit_best = max((row for row in train if row["model"] == dit_spec.label), key=lambda row: row["img_per_s"])
        comparison = {
            "diffit": {"backend": best["backend"], "compile": best["compile"]},
            "dit": {"backend": dit_best["backend"], "compile": dit_best["compile"]},
            "train_img_per_s_ratio": best["img_per_s"] / dit_best["img_per_s"],
            "peak_memory_ratio": best["peak_memory_bytes"] / dit_best["peak_memory_bytes"],
            "sample_img_per_s_ratio": sampling[0]["img_per_s"] / sampling[1]["img_per_s"],
            "diffit_mfu": best["mfu"],
            "dit_mfu": dit_best["mfu"],
        }
    meta = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "precision": config.precision if device.type == "cuda" else "fp32",
        "peak_tflops": peak,
        "model": {"label": spec.label, "backbone": spec.backbone, "preset": spec.recipe.model.get("preset"),
                  "options": {k: v for k, v in spec.recipe.model.items() if k not in ("backbone", "preset")}},
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "skipped_backends": skipped,
    }
    return {"meta": meta, "train": train, "attention": attention, "sampling": sampling, "comparison": comparison}
