"""``diffit-toolkit bench``: training, attention and sampling throughput, DiffiT vs DiT side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.table import Table

from diffit_toolkit.commands import app, check_output, finite, usage_errors
from diffit_toolkit.errors import RunFailure

console = Console()


def _options(pairs: list[str] | None) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--set takes key=value (a model option), got '{pair}'")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _shape(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None or text.lower() in ("", "none", "off"):
        return None
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--attention-shape takes B,H,N,d (e.g. 64,16,256,72) or 'off', got '{text}'") from None
    if len(values) != 4 or min(values) < 1:
        raise typer.BadParameter(f"--attention-shape takes 4 positive ints B,H,N,d, got '{text}'")
    return values


def _compile_modes(text: str) -> tuple[bool, ...]:
    modes = {"off": (False,), "on": (True,), "both": (False, True)}
    if text not in modes:
        raise typer.BadParameter(f"--compile takes off, on or both, got '{text}'")
    return modes[text]


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def print_report(report: dict) -> None:
    """The report as rich tables (training, attention, sampling, comparison)."""
    meta = report["meta"]
    table = Table(title=f"training step ({meta['device_name']}, {meta['precision']}, AdamW included)", title_justify="left")
    for column in ("model", "mechanism", "backend", "compile", "img/s", "step ms", "TFLOP/s", "MFU", "peak mem GiB"):
        table.add_column(column, justify="right" if column not in ("model", "mechanism", "backend") else "left")
    for row in report["train"]:
        mfu = None if row["mfu"] is None else 100 * row["mfu"]
        mem = row["peak_memory_bytes"] / 2**30
        table.add_row(row["model"], str(row["mechanism"]), row["backend"], "yes" if row["compile"] else "no",
                      _fmt(row["img_per_s"]), _fmt(row["step_ms"]), _fmt(row["tflops"], 3),
                      "n/a" if mfu is None else f"{mfu:.1f}%",
                      f"{mem:.2f}" + ("" if row["peak_memory_kind"] == "cuda_max_allocated" else " (RSS)"))
    console.print(table)
    if report["attention"]:
        table = Table(title=f"attention forward+backward {tuple(report['attention'][0]['shape'])} "
                      f"{report['attention'][0]['dtype']}", title_justify="left")
        for column in ("backend", "bias", "ms", "x sdpa without bias"):
            table.add_column(column)
        for row in report["attention"]:
            table.add_row(row["backend"], row["bias"], _fmt(row["ms"], 3), _fmt(row["ratio_to_reference"], 2))
        console.print(table)
    table = Table(title="sampling (classifier-free guidance doubles the model batch)", title_justify="left")
    for column in ("model", "backend", "sampler", "steps", "guidance", "batch", "img/s"):
        table.add_column(column)
    for row in report["sampling"]:
        table.add_row(row["model"], row["backend"], row["sampler"], str(row["steps"]),
                      f"{row['guidance_scale']:g}" + ("" if row["guided"] else " (off)"), str(row["batch"]),
                      _fmt(row["img_per_s"], 2))
    console.print(table)
    comparison = report["comparison"]
    if comparison:
        console.print(
            f"DiffiT / DiT (best rows): train img/s x{comparison['train_img_per_s_ratio']:.2f}, "
            f"peak memory x{comparison['peak_memory_ratio']:.2f}, sampling img/s x{comparison['sample_img_per_s_ratio']:.2f}",
            highlight=False,
        )


@app.command("bench")
def bench(
    recipe: str = typer.Option(None, help="Recipe path or name (its model, diffusion and sample sections)."),
    backbone: str = typer.Option("latent_diffit", help="Backbone when no recipe is given."),
    preset: str = typer.Option("XL/2", help="Backbone preset (e.g. XL/2; S/8 for a quick CPU run); 'none' for defaults."),
    mechanism: str = typer.Option(None, help="Conditioning mechanism (default: the backbone's / recipe's)."),
    set_: list[str] = typer.Option(None, "--set", help="Model option key=value (repeatable), e.g. --set input_size=16."),
    backend: list[str] = typer.Option(None, "--backend", help="Attention backend to train with (repeatable; default: auto + every usable one)."),
    compile_: str = typer.Option(None, "--compile", help="torch.compile rows: off, on or both (default: both on GPU, off on CPU)."),
    batch_size: int = typer.Option(None, min=1, help="Training batch (default: 64 on GPU, 4 on CPU)."),
    warmup: int = typer.Option(None, min=0, help="Untimed iterations (default: 3 on GPU, 1 on CPU)."),
    iters: int = typer.Option(None, min=1, help="Timed iterations (default: 10 on GPU, 2 on CPU)."),
    precision: str = typer.Option("bf16", help="bf16, fp16 or fp32 (autocast on GPU; CPU always runs fp32)."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    peak_tflops: float = typer.Option(None, min=0.001, callback=finite, help="Device peak TFLOP/s for MFU (default: known devices; n/a on CPU)."),
    attention_shape: str = typer.Option(None, help="B,H,N,d of the attention microbenchmark, or 'off' (default: 64,16,256,72 on GPU, 2,2,64,32 on CPU)."),
    sampler: str = typer.Option(None, help="Sampler (default: the recipe's, else ddpm)."),
    sample_steps: int = typer.Option(None, min=1, help="Sampling steps (default: the recipe's, else 250)."),
    guidance_scale: float = typer.Option(None, min=0.0, callback=finite, help="Guidance scale (default: the recipe's, else 4.0)."),
    sample_batch: int = typer.Option(None, min=1, help="Images per sampling batch (default: 16 on GPU, 2 on CPU)."),
    compare_dit: bool = typer.Option(True, "--compare-dit/--no-compare-dit", help="Also measure the same-size adaln_zero (DiT) model."),
    out: Path = typer.Option(None, help="Also write the report to this JSON file."),
) -> None:
    """Benchmark training (img/s, MFU, memory), attention and sampling; DiffiT vs DiT side by side."""
    check_output(out, "--out")
    import torch

    from diffit_toolkit.bench import BenchConfig, run_bench

    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    with usage_errors(ValueError):  # a recipe, model option or backend that cannot run
        config = BenchConfig(
            recipe=recipe,
            backbone=backbone,
            preset=None if preset is None or preset.lower() == "none" else preset,
            mechanism=mechanism,
            model_options=_options(set_),
            backends=list(backend) if backend else None,
            compile_modes=_compile_modes(compile_ or ("both" if on_gpu else "off")),
            batch_size=batch_size or (64 if on_gpu else 4),
            warmup=warmup if warmup is not None else (3 if on_gpu else 1),
            iters=iters or (10 if on_gpu else 2),
            precision=precision,
            device=device,
            peak_tflops=peak_tflops,
            attention_shape=_shape(attention_shape or ("64,16,256,72" if on_gpu else "2,2,64,32")),
            sampler=sampler,
            sample_steps=sample_steps,
            guidance_scale=guidance_scale,
            sample_batch=sample_batch or (16 if on_gpu else 2),
            compare_dit=compare_dit,
        )
        report = run_bench(config, progress=lambda message: console.print(f"[dim]{message}[/dim]", highlight=False))
    print_report(report)
    if out is not None:
        from diffit_toolkit.runs import write_text_atomic

        try:
            write_text_atomic(out, json.dumps(report, indent=2, default=str))
        except OSError as exc:
            raise RunFailure(f"could not write {out} ({exc.strerror or exc}); the figures are printed above") from exc
        console.print(f"wrote {out}", highlight=False)
