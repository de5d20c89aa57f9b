"""The GPU acceptance run: everything the GPU paths promise, measured and checked in one command.

    python benchmarks/gpu_acceptance.py                       # one CUDA GPU, <= 8 minutes
    python benchmarks/gpu_acceptance.py --device cpu --tiny   # the same parts at toy size (tests)

Each part runs in its own subprocess with its own timeout, so a hang or a crash loses only that
part; its reason is recorded and the others still run. Parts:

* ``environment``: device, versions of torch / CUDA / triton and of every dependency.
* ``cuda_tests``: the tests marked ``cuda`` (pytest ``-m cuda``).
* ``triton_kernels``: the fused Triton attention against the fp32 ``math`` backend, forward and
  backward: the kernel entry points (gathered table, per-sample tables over windows with an extra
  key, dense bias) and ``Attention`` inside a ``DiffiTBlock`` for every mechanism that touches the
  bias, head dim 72, bf16 at full size (CPU: Triton's interpreter, fp32, toy size).
* ``compile_block``: ``torch.compile`` of a DiffiT block per attention backend, output and
  gradients against eager, no graph break for sdpa and triton.
* ``train``: a short real training through ``diffit-toolkit train`` (bf16, compiled), then a
  resume from its checkpoint: the loss falls, checkpoints, samples and the loss curve are written.
* ``ddp`` / ``fsdp``: the trainer's DDP and FSDP2 paths in a torchrun process group of one (NCCL on
  CUDA, gloo on the CPU): initialisation, one step, a checkpoint gathered, read back and resumed.
* ``bench``: DiffiT-XL/2 against DiT-XL/2, both compiled, in one process (``run_bench``) for every
  attention backend that loads and compiles, plus 25-step DPM-Solver++ sampling; the figures are
  checked against the targets of docs/performance.md.

The correctness parts run side by side (``--jobs``); ``bench`` runs alone afterwards and gets what
is left of ``--budget``. Written to ``--out``: ``acceptance.json`` (device, versions, every figure,
every target with pass/fail, every failure's one-line reason), ``acceptance.md`` (tables for
docs/performance.md) and ``logs/<part>.log``; to ``--work`` (default: ``--out``) the synthetic data
and the run folders with their checkpoints.
Exit code: 0 when no part failed and no applicable target was missed, else 1.

Fault injection (used by the tests): ``DIFFIT_ACCEPTANCE_RAISE=part,...`` makes those parts raise.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RAISE_ENV = "DIFFIT_ACCEPTANCE_RAISE"

#: Part name -> (needs CUDA, GPU timeout s, tiny timeout s, phase). Phase 1 parts run side by side,
#: phase 2 (timings) alone, after them.
PARTS: dict[str, tuple[bool, int, int, int]] = {
    "environment": (False, 60, 60, 1),
    "cuda_tests": (True, 180, 60, 1),
    "triton_kernels": (False, 150, 120, 1),
    "compile_block": (False, 180, 90, 1),
    "train": (False, 240, 120, 1),
    "ddp": (False, 120, 90, 1),
    "fsdp": (False, 120, 90, 1),
    "bench": (False, 330, 120, 2),
}
#: The order phase 1 starts them in: the longest first, so that they overlap the others.
START_ORDER = ("train", "compile_block", "cuda_tests", "triton_kernels", "ddp", "fsdp", "environment", "bench")

#: Dependencies: (distribution, import name, parts that need it). Distributions of pyproject that
#: no part imports (diffusers, scikit-learn, scipy, torch-fidelity, torchvision) are listed as such.
CORE = tuple(p for p in PARTS if p not in ("environment",))
DEPENDENCIES: list[tuple[str, str, tuple[str, ...]]] = [
    ("torch", "torch", tuple(PARTS)),
    ("numpy", "numpy", CORE),
    ("einops", "einops", CORE),
    ("pluggy", "pluggy", CORE),
    ("lightning-utilities", "lightning_utilities", CORE),
    ("typer", "typer", CORE),
    ("rich", "rich", CORE),
    ("safetensors", "safetensors", CORE),
    ("pyyaml", "yaml", CORE),
    ("pydantic", "pydantic", CORE),
    ("pillow", "PIL", ("train", "ddp", "fsdp")),
    ("matplotlib", "matplotlib", ("train",)),
    ("pytest", "pytest", ("cuda_tests",)),
    ("hypothesis", "hypothesis", ("cuda_tests",)),
    ("triton", "triton", ("triton_kernels",)),
    ("xformers", "xformers", ()),
    ("diffusers", "diffusers", ()),
    ("scikit-learn", "sklearn", ()),
    ("scipy", "scipy", ()),
    ("torch-fidelity", "torch_fidelity", ()),
    ("torchvision", "torchvision", ()),
]

#: What the GPU machines' image lacks of what the parts import (its package list of 2026-11: Python
#: 3.12, torch 2.11, triton, numpy, pillow, matplotlib, pytest, hypothesis, pyyaml, rich, typer,
#: einops, pluggy, lightning-utilities, safetensors are there): pydantic and what it needs, at the
#: versions installed here.
GPU_WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64")

#: The Performance page's targets (H100, DiffiT-XL/2 at 256 px, batch 64, bf16).
TARGETS = [
    # name, figure key, comparison, threshold, unit, what
    ("train_vs_dit", "train_img_per_s_ratio", ">=", 1.0, "x", "training img/s vs DiT-XL/2 compiled, same run"),
    ("mfu", "diffit_mfu", ">=", 0.45, "", "model FLOP utilisation of DiffiT-XL/2 training"),
    ("memory_vs_dit", "peak_memory_ratio", "<=", 1.0, "x", "peak memory vs DiT-XL/2"),
    ("attention_bias_vs_sdpa", "attention_best_bias_ratio", "<=", 1.1, "x",
     "attention fwd+bwd with relative bias vs SDPA without bias"),
    ("ddpm250_guided", "ddpm_img_per_s", ">=", 3.3, "img/s", "guided DDPM-250 sampling"),
    ("dpm25", "dpm_img_per_s", ">=", 30.0, "img/s", "25-step DPM-Solver++ sampling"),
]
BENCH_BACKENDS = ("sdpa", "triton", "flex", "xformers")
#: Backends promised to compile into one graph with the block (no graph break).
ONE_GRAPH = ("sdpa", "triton", "math")


def bench_backends(tiny: bool) -> tuple[str, ...]:
    """The backends compiled and benchmarked; the tiny run adds ``math`` (the CPU can train with
    it), so that the loop over further backends runs on the CPU too."""
    return BENCH_BACKENDS + (("math",) if tiny else ())


# == the parts (each runs in its own process: ``--part NAME``) ====================================


class Checks:
    """Named yes/no checks of a part, each with a one-line detail."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, ok: bool, detail: Any = "") -> bool:
        detail = " ".join(str(detail).split())[:300]  # one line
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})
        print(f"check {name}: {'ok' if ok else 'FAIL'} {detail}", flush=True)
        return bool(ok)


def _device(ctx: dict[str, Any]):
    import torch

    return torch.device(ctx["device"])


def part_environment(ctx: dict[str, Any], checks: Checks) -> dict[str, Any]:
    import torch

    figures: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                               "cpu_threads": torch.get_num_threads()}
    if ctx["device"] == "cuda":
        props = torch.cuda.get_device_properties(0)
        figures.update(device_name=props.name, gpu_count=torch.cuda.device_count(),
                       capability=f"{props.major}.{props.minor}", gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       cudnn=torch.backends.cudnn.version(), nccl=_nccl_version())
        checks.add("cuda_device", True, props.name)
    else:
        figures["device_name"] = platform.processor() or platform.machine()
    figures["versions"] = {dist: _version(dist) for dist, _, _ in DEPENDENCIES}
    from diffit_toolkit.registry import attention_backends

    figures["attention_backends"] = {e.name: e.obj.unavailable_reason() or "available" for e in attention_backends.entries()}
    checks.add("registry_loads", "sdpa" in figures["attention_backends"], sorted(figures["attention_backends"]))
    return figures


def _nccl_version() -> str | None:
    import torch

    try:
        version = torch.cuda.nccl.version()
    except Exception:  # a build without NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def part_cuda_tests(ctx: dict[str, Any], checks: Checks) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.cuda" in p.read_text(errors="replace"))
    report = Path(ctx["out"]) / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", *files]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ctx["timeout"] - 10)
    print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
    if not report.is_file():
        said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()] or [""]
        raise RuntimeError(f"pytest wrote no report (rc {proc.returncode}): {said[-1][:300]}")
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append(f"{case.get('name')}: {(bad.get('message') or '').splitlines()[0][:160] if bad.get('message') else ''}")
    checks.add("collected", counts["tests"] > 0, f"{counts['tests']} tests in {', '.join(files)}")
    checks.add("passed", proc.returncode == 0 and not counts["failures"] and not counts["errors"],
               "; ".join(failed) or f"rc {proc.returncode}")
    checks.add("none_skipped", counts["skipped"] == 0, f"{counts['skipped']} skipped")
    return {"files": files, **counts, "failed": failed}


def _rel_err(got, want) -> float:
    """||got - want|| / ||want|| in fp32 (the relative Frobenius error)."""
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def part_triton_kernels(ctx: dict[str, Any], checks: Checks) -> dict[str, Any]:
    """The fused kernels and blocks, triton vs fp32 math: output and every gradient."""
    import torch

    from diffit_toolkit import BlockSpec, DiffiTBlock
    from diffit_toolkit.nn.attention import attention_gathered_math, attention_math, relative_position_index
    from diffit_toolkit.registry import attention_backends

    reason = attention_backends.get("triton").unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the triton backend is unavailable: {reason}")
    from diffit_plugins.triton_attention import attention_triton, gathered_attention_triton

    dev, tiny = _device(ctx), ctx["tiny"]
    dtype = torch.float32 if tiny else torch.bfloat16
    tol = 1e-4 if tiny else 3e-2
    # full size: B 64, 16 heads of 72, a 16x16 grid (N 256), 8x8 windows; tiny: the interpreter's size
    B, H, grid, d, win = (2, 2, 4, 72, 2) if tiny else (64, 16, 16, 72, 8)
    N, scale = grid * grid, d**-0.5
    g = torch.Generator(device="cpu").manual_seed(0)
    errors: dict[str, float] = {}

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dev)

    def kernel_case(name: str, run_fused, run_ref, inputs: dict[str, Any], do) -> None:
        grads = []
        for run in (run_fused, run_ref):
            leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
            out = run(**leaves)
            out.backward(do.to(out.dtype))
            grads.append({"out": out, **{f"d_{k}": v.grad for k, v in leaves.items()}})
        for key in grads[1]:
            err = _rel_err(grads[0][key], grads[1][key])
            errors[f"{name}.{key}"] = err
            checks.add(f"{name}.{key}", err <= tol, f"rel err {err:.2e} (tol {tol:g})")

    def low(t):  # q/k/v in the run's dtype for the fused kernel; the reference promotes to fp32
        return t.to(dtype)

    # 1. one shared table over a global grid (tmsa)
    index = relative_position_index((grid, grid)).to(dev)
    T = (2 * grid - 1) ** 2
    qkv = {"q": rnd(B, H, N, d), "k": rnd(B, H, N, d), "v": rnd(B, H, N, d), "table": rnd(T, H, s=0.5)}
    kernel_case("gathered_global",
                lambda q, k, v, table: gathered_attention_triton(low(q), low(k), low(v), table, index, None, scale),
                lambda q, k, v, table: attention_gathered_math(low(q).float(), low(k).float(), low(v).float(), table, index,
                                                               None, scale),
                qkv, rnd(B, H, N, d))
    # 2. per-sample tables (relative_bias) over windows, with an extra key (separate_token)
    n_w, windows = win * win, (grid // win) ** 2
    Tw = (2 * win - 1) ** 2
    index_w = relative_position_index((win, win)).to(dev)
    inputs = {"q": rnd(B * windows, H, n_w, d), "k": rnd(B * windows, H, n_w + 1, d), "v": rnd(B * windows, H, n_w + 1, d),
              "table": rnd(Tw, H, s=0.5), "offset": rnd(B, Tw, H, s=0.3)}
    kernel_case("gathered_windows_offset_extra",
                lambda q, k, v, table, offset: gathered_attention_triton(low(q), low(k), low(v), table, index_w, offset, scale),
                lambda q, k, v, table, offset: attention_gathered_math(low(q).float(), low(k).float(), low(v).float(), table,
                                                                      index_w, offset, scale),
                inputs, rnd(B * windows, H, n_w, d))
    # 3. a dense bias broadcast over the batch
    inputs = {"q": rnd(B, H, N, d), "k": rnd(B, H, N, d), "v": rnd(B, H, N, d), "bias": rnd(1, H, N, N, s=0.5)}
    kernel_case("dense_bias", lambda q, k, v, bias: attention_triton(low(q), low(k), low(v), bias, scale),
                lambda q, k, v, bias: attention_math(low(q).float(), low(k).float(), low(v).float(), bias, scale),
                inputs, rnd(B, H, N, d))

    # 4. Attention in a DiffiTBlock for every mechanism that touches the bias, both blocks in bf16
    #    autocast (math computes its attention in fp32 from the same bf16 q, k, v)
    blocks_b = 2 if tiny else 8
    for mechanism, window in (("tmsa", None), ("window_tmsa", win), ("relative_bias", None), ("relative_bias", win),
                              ("separate_token", None), ("separate_token", win)):
        name = f"block_{mechanism}" + (f"_w{window}" if window else "")
        pair = []
        for backend in ("triton", "math"):
            spec = BlockSpec(dim=H * d, num_heads=H, cond_dim=64, grid=(grid, grid), window=(window, window) if window else None,
                             rel_pos_bias=True, attention_backend=backend)
            pair.append(DiffiTBlock(spec, mechanism).to(dev))
        gb = torch.Generator(device="cpu").manual_seed(len(name))
        with torch.no_grad():  # random non-zero weights everywhere (zero inits would hide a wrong gradient)
            for p in pair[1].parameters():
                p.copy_(torch.randn(p.shape, generator=gb).to(dev) * (0.3 if p.ndim < 2 else p.shape[-1] ** -0.5))
        pair[0].load_state_dict(pair[1].state_dict())
        picked = pair[0].attn.backend.pick(dev.type, dtype, True, d, True)
        checks.add(f"{name}.backend", picked.name == "triton" and picked.gathered_fn is not None, picked.name)
        x, c = rnd(blocks_b, N, H * d), rnd(blocks_b, 64)
        found = []
        for block in pair:  # both under the same autocast: what differs is the attention kernel
            autocast = not tiny
            xi, ci = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                out = block(xi, ci)
            out.float().square().mean().backward()
            found.append({"out": out, "x": xi.grad, "c": ci.grad, **{n: p.grad for n, p in block.named_parameters()}})
        worst = max(found[1], key=lambda key: _rel_err(found[0][key], found[1][key]))
        bad = [key for key in found[1] if not _rel_err(found[0][key], found[1][key]) <= tol]
        errors[name] = _rel_err(found[0][worst], found[1][worst])
        checks.add(name, not bad, f"{len(found[1])} tensors (output, x, c, every parameter); worst {worst} "
                   f"{errors[name]:.2e} (tol {tol:g})" + (f"; over: {', '.join(bad[:5])}" if bad else ""))
    return {"dtype": str(dtype).replace("torch.", ""), "shape": [B, H, N, d], "window": win, "tolerance": tol,
            "max_rel_err": max(errors.values()), "rel_err": errors}


def part_compile_block(ctx: dict[str, Any], checks: Checks) -> dict[str, Any]:
    """``torch.compile`` of a DiffiT block (tmsa, relative bias) per backend: output and every
    gradient equal eager's; one graph (no break) for the backends of `ONE_GRAPH`."""
    import torch
    import torch._dynamo

    from diffit_toolkit import BlockSpec, DiffiTBlock
    from diffit_toolkit.registry import attention_backends

    dev, tiny = _device(ctx), ctx["tiny"]
    dtype = torch.float32 if tiny else torch.bfloat16
    compiler = "aot_eager" if tiny else "inductor"  # inductor on a CPU needs a C++ build (a minute)
    heads, d, grid, batch = (2, 32, 4, 2) if tiny else (16, 72, 16, 8)
    tol = 1e-4 if tiny else 3e-2
    rows, compiled_ok = {}, []
    for name in bench_backends(tiny):
        backend = attention_backends.get(name)
        reason = backend.unavailable_reason()
        if reason is None and not backend.supports(dev.type, dtype, True, d, True):
            reason = f"cannot train on {dev.type} {str(dtype).replace('torch.', '')}"
        if reason is not None:
            rows[name] = {"status": "skip", "reason": reason}
            continue
        torch._dynamo.reset()
        torch.manual_seed(0)
        spec = BlockSpec(dim=heads * d, num_heads=heads, cond_dim=64, grid=(grid, grid), rel_pos_bias=True,
                         attention_backend=name)
        block = DiffiTBlock(spec, "tmsa").to(dev)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.3 if p.ndim < 2 else p.shape[-1] ** -0.5)
        x, c = torch.randn(batch, grid * grid, spec.dim, device=dev), torch.randn(batch, 64, device=dev)
        graphs: list[int] = []

        def counting(gm, example_inputs):
            graphs.append(1)
            return torch._dynamo.lookup_backend(compiler)(gm, example_inputs)

        def grads(call):
            block.zero_grad()
            xi, ci = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not tiny):
                out = call(xi, ci)
            out.float().square().mean().backward()
            return {"out": out.detach(), "x": xi.grad, "c": ci.grad, **{n: p.grad.clone() for n, p in block.named_parameters()}}

        want = grads(block)
        start = time.perf_counter()
        try:  # as the trainer compiles (graph breaks allowed); the breaks are counted below
            got = grads(torch.compile(block, backend=counting))
        except Exception as exc:  # the failure is this backend's result
            rows[name] = {"status": "fail", "reason": _one_line(exc)}
            checks.add(f"{name}.compiles", False, rows[name]["reason"])
            continue
        seconds = time.perf_counter() - start
        worst = max(_rel_err(got[k], want[k]) for k in want)
        ok = checks.add(f"{name}.matches_eager", worst <= tol, f"worst rel err {worst:.2e} over {len(want)} tensors")
        if name in ONE_GRAPH:
            ok &= checks.add(f"{name}.one_graph", len(graphs) == 1, f"{len(graphs)} graph(s)")
        rows[name] = {"status": "pass" if ok else "fail", "compile_s": round(seconds, 2), "max_rel_err": worst,
                      "graphs": len(graphs)}
        if ok:
            compiled_ok.append(name)
    checks.add("some_backend_compiled", bool(compiled_ok), ", ".join(compiled_ok) or "none")
    return {"compiler": compiler, "dtype": str(dtype).replace("torch.", ""), "backends": rows, "compiled_ok": compiled_ok}


DATA_FILE = "synthetic_32x32.npz"


def write_synthetic_data(out: Path, count: int = 2048, seed: int = 0) -> Path:
    """Synthetic class-conditional images (no download, made in a second): 32 x 32 RGB gratings,
    orientation, frequency and colour set by the class (10 classes), random phase and a little
    noise; uint8 in ADM's ``.npz`` layout (``arr_0`` NHWC, ``arr_1`` labels). At patch 2 they are a
    16 x 16 token grid, the grid of XL/2 at 256 px."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    angle = labels * np.pi / 10
    freq = 1.5 + (labels % 3)
    phase = rng.uniform(0, 2 * np.pi, count)
    wave = np.sin(2 * np.pi * freq[:, None, None] * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
                  + phase[:, None, None])
    colour = np.stack([np.cos(labels * 0.6), np.sin(labels * 0.9), np.cos(labels * 1.3 + 1)], -1)  # (N, 3)
    images = 0.8 * wave[..., None] * colour[:, None, None, :] + 0.05 * rng.standard_normal((count, 32, 32, 3))
    path = out / DATA_FILE
    np.savez(path, arr_0=((images.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8), arr_1=labels.astype(np.int64))
    return path


RECIPE_FILE = "acceptance_recipe.yaml"


def write_recipe(out: Path) -> Path:
    """The recipe of the training parts (the parts set the model size and schedule with overrides):
    a class-conditional latent_diffit (TMSA, relative bias) on the synthetic data, the Gaussian
    process (cosine schedule, epsilon), DDIM grids with guidance. JSON is YAML."""
    recipe = {
        "name": "gpu_acceptance",
        "model": {"backbone": "latent_diffit", "preset": "S/2", "input_size": 32, "in_channels": 3, "num_classes": 10,
                  "class_dropout_prob": 0.1, "mechanism": "tmsa", "rel_pos_bias": True},
        "diffusion": {"process": "gaussian", "schedule": "cosine", "learn_sigma": False},
        "data": {"kind": "npz", "path": str(out / DATA_FILE)},
        "train": {"batch_size": 64, "lr": 1e-3, "warmup_steps": 50, "grad_clip": 1.0, "ema_decay": 0.999,
                  "ema_warmup": True, "max_steps": 300, "log_every": 5, "ckpt_every": 150, "keep_last": 10},
        "sample": {"sampler": "ddim", "steps": 10, "num_images": 20, "guidance_scale": 2.0, "clip_denoised": True},
    }
    path = out / RECIPE_FILE
    path.write_text(json.dumps(recipe, indent=1) + "\n")
    return path


def _train_settings(ctx: dict[str, Any]) -> dict[str, Any]:
    """The training part's model and schedule: latent_diffit S/2 on the synthetic 32x32x3 images
    (a 16x16 token grid, the token count of XL/2 at 256 px) on a GPU; a one-block model on the CPU."""
    if ctx["tiny"]:
        return {"label": "latent_diffit tiny (width 32, 1 block, patch 4)", "steps": 40, "ckpt_every": 20, "more": 4,
                "set": ["model.preset=null", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                        "model.patch_size=4", "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=5", "train.log_every=1",
                        "train.precision=fp32", "train.compile=false", "sample.num_images=10", "sample.steps=4"]}
    return {"label": "latent_diffit S/2 (width 384, 12 blocks, patch 2, 256 tokens)", "steps": 300, "ckpt_every": 150,
            "more": 20,
            "set": ["model.preset=S/2", "train.batch_size=64", "train.lr=1e-3", "train.warmup_steps=50", "train.log_every=5",
                    "train.precision=bf16", "train.compile=true", "sample.num_images=20"]}


def _cli(args: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "diffit_toolkit.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    with log.open("a") as f:
        f.write(f"$ diffit-toolkit {' '.join(args)}\n{proc.stdout}\n{proc.stderr}\n(rc {proc.returncode})\n")
    return proc


def part_train(ctx: dict[str, Any], checks: Checks) -> dict[str, Any]:
    """``diffit-toolkit train`` on the shapes, then the same run continued from its checkpoint."""
    from PIL import Image

    from diffit_toolkit.runs import list_checkpoints, load_checkpoint

    settings = _train_settings(ctx)
    run = Path(ctx["work"]) / "train_run"
    shutil.rmtree(run, ignore_errors=True)
    log = Path(ctx["out"]) / "train_commands.log"
    steps, more = settings["steps"], settings["more"]
    common = ["train", str(Path(ctx["work"]) / RECIPE_FILE), "--device", ctx["device"], "--no-progress", "--output-dir", str(run),
              *[a for s in settings["set"] for a in ("--set", s)],
              "--set", f"train.ckpt_every={settings['ckpt_every']}", "--set", "train.keep_last=2"]
    start = time.perf_counter()
    first = _cli([*common, "--set", f"train.max_steps={steps}"], ctx["timeout"] * 0.75, log)
    first_s = time.perf_counter() - start
    tail = (first.stderr.strip().splitlines() or [""])[-1]
    if not checks.add("first_run_exit_0", first.returncode == 0, f"rc {first.returncode} {tail[:200]}"):
        return {"seconds": first_s}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m and m.get("step", 0) <= steps]
    k = max(1, len(losses) // 10)
    head, tail_loss = sum(losses[:k]) / k, sum(losses[-k:]) / k
    checks.add("losses_finite", losses and all(math.isfinite(x) for x in losses), f"{len(losses)} logged losses")
    checks.add("loss_falls", tail_loss < 0.85 * head, f"mean of the first {k} {head:.4f} -> last {k} {tail_loss:.4f}")
    ckpts = [c.name for c in list_checkpoints(run)]
    want = [f"step_{s:07d}" for s in range(settings["ckpt_every"], steps + 1, settings["ckpt_every"])]
    checks.add("checkpoints_written", ckpts == want, ckpts)
    grid = run / "samples.png"
    size = Image.open(grid).size if grid.is_file() else None
    checks.add("samples_written", size is not None and min(size) > 0, f"{grid.name} {size}")
    checks.add("loss_curve_written", (run / "loss.png").is_file(), "loss.png")

    start = time.perf_counter()  # continue the run from its last checkpoint, uncompiled (the key layout is the same)
    second = _cli([*common, "--set", f"train.max_steps={steps + more}", "--set", "train.compile=false"],
                  max(10.0, ctx["timeout"] - (time.perf_counter() - ctx["started"]) - 5), log)
    resume_s = time.perf_counter() - start
    said = second.stdout + second.stderr
    last = (second.stderr.strip().splitlines() or [""])[-1][:200]
    checks.add("resume_exit_0", second.returncode == 0, f"rc {second.returncode} {last}")
    checks.add("resumed_from_checkpoint", f"resumed from {run / 'checkpoints' / want[-1]}" in " ".join(said.split())
               or f"at step {steps}" in said, "the start message names the checkpoint and step")
    final = list_checkpoints(run)[-1] if list_checkpoints(run) else None
    step = load_checkpoint(final)["state"]["step"] if final else None
    checks.add("resumed_to_the_end", step == steps + more, f"final checkpoint {final.name if final else None} at step {step}")
    later = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    new_steps = [m["step"] for m in later if "loss" in m][len(losses):]
    checks.add("resume_continues_the_steps", new_steps and min(new_steps) == steps + 1 and max(new_steps) == steps + more,
               f"steps {new_steps[:1]}..{new_steps[-1:]}")
    return {"model": settings["label"], "steps": steps, "seconds": round(first_s, 1), "resume_seconds": round(resume_s, 1),
            "steps_per_s": steps / first_s, "loss_first": head, "loss_last": tail_loss, "checkpoints": ckpts,
            "run_dir": str(run)}


def part_distributed(ctx: dict[str, Any], checks: Checks, strategy: str) -> dict[str, Any]:
    """torchrun --nproc_per_node=1 of the worker below (``--dist-worker``)."""
    result = Path(ctx["out"]) / f"{strategy}_worker.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
           str(Path(__file__).resolve()), "--dist-worker", strategy, "--device", ctx["device"], "--out", ctx["out"],
           "--work", ctx["work"],
           *(["--tiny"] if ctx["tiny"] else [])]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ctx["timeout"] - 5)
    print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    if not result.is_file():
        lines = ([line for line in proc.stderr.splitlines() if line.strip() and "Error" in line]
                 or proc.stderr.splitlines() or [""])
        raise RuntimeError(f"torchrun exited with code {proc.returncode}: {lines[-1].strip()[:300]}")
    data = json.loads(result.read_text())
    for item in data.pop("checks"):
        checks.add(item["name"], item["ok"], item["detail"])
    checks.add("torchrun_exit_0", proc.returncode == 0, f"rc {proc.returncode}")
    return data


def dist_worker(strategy: str, device: str, out: str, work: str, tiny: bool) -> int:
    """One torchrun process: a process group of one (NCCL on CUDA, gloo on the CPU), the trainer's
    ``strategy`` path on it (DDP wrapper or FSDP2 shards), one step, a checkpoint gathered and
    written, read back into a fresh trainer, one more step."""
    import dataclasses

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    from diffit_toolkit.build import build_dataset, load_recipe
    from diffit_toolkit.runs import load_checkpoint
    from diffit_toolkit.train.distributed import DistEnv, full_model_state
    from diffit_toolkit.train.trainer import Trainer

    checks = Checks()

    @dataclasses.dataclass(frozen=True)
    class GroupOfOne(DistEnv):
        """``setup_distributed`` joins no group for one process; this place takes the trainer's
        distributed path (the DDP wrapper, FSDP2 shards, collectives) on a group of one."""

        @property
        def distributed(self) -> bool:
            return dist.is_initialized()

    local_rank = int(os.environ["LOCAL_RANK"])
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    start = time.perf_counter()
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **({"device_id": dev} if dev.type == "cuda" else {}))
    figures: dict[str, Any] = {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                               "init_s": round(time.perf_counter() - start, 2)}
    checks.add("process_group", dist.get_backend() == ("nccl" if dev.type == "cuda" else "gloo"), figures["backend"])
    env = GroupOfOne(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev)
    size = (["model.preset=null", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
             "train.batch_size=8"] if tiny
            else ["model.preset=S/2", "model.depth=4", "train.batch_size=32", "train.precision=bf16"])
    run_dir = Path(work) / f"{strategy}_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = load_recipe(Path(work) / RECIPE_FILE,
                         [*size, f"train.strategy={strategy}", f"output_dir={run_dir}"])
    trainer = Trainer(recipe, env, dataset=build_dataset(recipe)).setup()
    if strategy == "ddp":
        checks.add("ddp_wrapped", isinstance(trainer.train_model, DistributedDataParallel), type(trainer.train_model).__name__)
    else:
        checks.add("fsdp_sharded", trainer.sharded and isinstance(trainer.model, FSDPModule)
                   and trainer.sharded_blocks == recipe.model["depth"], f"{trainer.sharded_blocks} blocks sharded")
    batches = trainer.batches()
    start = time.perf_counter()
    stats = trainer.train_step(*next(batches))
    figures["step_s"] = round(time.perf_counter() - start, 3)
    checks.add("one_step", stats.applied and math.isfinite(stats.loss), f"loss {stats.loss:.4f} grad norm {stats.grad_norm:.3f}")
    config = {"recipe": recipe.to_dict(), "model": trainer.model.config, "data": trainer.facts}
    path = trainer.save_checkpoint(run_dir, config)
    full = full_model_state(trainer.model)
    ckpt = load_checkpoint(path)
    same = ckpt["model"].keys() == full.keys() and all(torch.equal(ckpt["model"][k].cpu(), full[k].cpu()) for k in full)
    checks.add("checkpoint_holds_the_full_weights", ckpt["state"]["step"] == 1 and same,
               f"step {ckpt['state']['step']}, {len(ckpt['model'])} tensors")
    again = Trainer(recipe, env, dataset=build_dataset(recipe)).setup()
    again.load_checkpoint(load_checkpoint(path, map_location=dev))
    stats = again.train_step(*next(again.batches()))
    checks.add("resumed_step", again.step == 2 and stats.applied and math.isfinite(stats.loss), f"step {again.step}")
    figures["checkpoint"] = str(path)
    dist.barrier()
    dist.destroy_process_group()
    (Path(out) / f"{strategy}_worker.json").write_text(json.dumps({**figures, "checks": checks.items}))
    return 0


def part_ddp(ctx, checks):
    return part_distributed(ctx, checks, "ddp")


def part_fsdp(ctx, checks):
    return part_distributed(ctx, checks, "fsdp")


def part_bench(ctx: dict[str, Any], checks: Checks) -> dict[str, Any]:
    """``run_bench`` in this one process: DiffiT-XL/2 with the first backend against DiT-XL/2, both
    compiled (every target's figure, the attention microbenchmark of every backend, guided
    DDPM-250 sampling), then 25-step DPM-Solver++ sampling, then one training row per further
    backend that loads and compiled in ``compile_block``. After each step the figures so far are
    written, so a timeout keeps them."""
    import torch

    from diffit_toolkit.bench import BenchConfig, run_bench
    from diffit_toolkit.bench.harness import _dit_spec, _model_specs, sampling_bench
    from diffit_toolkit.registry import attention_backends

    tiny = ctx["tiny"]
    compiled = _read_part(ctx["out"], "compile_block")
    passed = (compiled or {}).get("figures", {}).get("compiled_ok")
    backends, excluded = [], {}
    for name in bench_backends(tiny):
        reason = attention_backends.get(name).unavailable_reason()
        if reason is None and passed is not None and name not in passed:
            reason = "did not pass compile_block: " + str(compiled["figures"]["backends"].get(name, {}).get("reason", "failed"))
        if reason is None:
            backends.append(name)
        else:
            excluded[name] = reason
    if not backends:
        raise RuntimeError(f"no attention backend to benchmark: {excluded}")
    if tiny:
        base = dict(recipe=str(ROOT / "recipes" / "diffit_latent.yaml"), device="cpu", precision="fp32",
                    model_options={"preset": "S/8", "input_size": 16, "depth": 2}, compile_modes=(False,), batch_size=2,
                    warmup=1, iters=2, attention_shape=(1, 2, 16, 32), sample_steps=2, sample_batch=2)
        dpm_steps = 2
    else:  # the Performance page's setting: XL/2 at 256 px (32x32x4 latents), batch 64, bf16, compiled
        base = dict(recipe=str(ROOT / "recipes" / "diffit_latent.yaml"), device="cuda", precision="bf16",
                    compile_modes=(True,), batch_size=64, warmup=3, iters=10, attention_shape=(64, 16, 256, 72),
                    sample_batch=16)
        dpm_steps = 25
    say = lambda message: print(f"bench: {message}", flush=True)  # noqa: E731
    # 1. the first backend (sdpa when it loads) side by side with DiT; attention rows of every backend
    config = BenchConfig(**{**base, "backends": backends[:1], "attention_shape": None})
    report = run_bench(config, progress=say)
    failures: dict[str, str] = {}
    figures = {"excluded_backends": excluded, "backends_done": backends[:1], "backend_failures": failures, "report": report}
    _figures_from(report, figures)
    _save_partial(ctx, figures)
    say(f"attention microbenchmark {base['attention_shape']} of {', '.join(backends)}")
    report["attention"] = run_bench_attention(base, backends, failures)
    _figures_from(report, figures)
    _save_partial(ctx, figures)
    # 2. 25-step DPM-Solver++ with the same models
    spec, sample = _model_specs(config)
    dpm = sample.model_copy(update={"sampler": "dpm_solver++", "steps": dpm_steps})
    device = torch.device(config.device)
    say(f"sampling dpm_solver++ x{dpm_steps}")
    report["sampling_dpm"] = [sampling_bench(spec, dpm, config, device, report["comparison"]["diffit"]["backend"]),
                              sampling_bench(_dit_spec(spec), dpm, config, device, "auto")]
    _figures_from(report, figures)
    _save_partial(ctx, figures)
    # 3. the further backends: training rows against the same DiT row (sampling kept to 2 steps)
    for name in backends[1:]:
        try:
            extra = run_bench(BenchConfig(**{**base, "backends": [name], "compare_dit": False, "attention_shape": None,
                                             "sample_steps": 2}), progress=say)
        except Exception as exc:  # this backend's training row fails; the others are kept
            traceback.print_exc()
            failures[f"train {name}"] = _one_line(exc)
            continue
        report["train"] += extra["train"]
        figures["backends_done"].append(name)
        _figures_from(report, figures)
        _save_partial(ctx, figures)
    checks.add("dit_compared", any(r["model"].startswith("dit") for r in report["train"]),
               [r["model"] + ":" + r["backend"] for r in report["train"]])
    checks.add("every_backend_measured", figures["backends_done"] == backends and not failures,
               "; ".join(f"{k}: {v}" for k, v in failures.items()) or ", ".join(figures["backends_done"]))
    checks.add("every_figure_finite", all(_finite(v) for v in _numbers(report)), "train, attention, sampling rows")
    return figures


def run_bench_attention(base: dict[str, Any], backends: list[str], failures: dict[str, str]) -> list[dict[str, Any]]:
    """The harness's attention microbenchmark, one backend at a time (a backend that fails is
    recorded in ``failures``, the others are kept): dense bias, in-kernel gather, and sdpa without
    bias as the reference line (each backend's ratio is to the reference timed in its own call)."""
    import torch

    from diffit_toolkit.bench.harness import attention_microbench

    device = torch.device(base["device"])
    rows: list[dict[str, Any]] = []
    for name in backends:
        try:
            found = attention_microbench(tuple(base["attention_shape"]), device, base["precision"],
                                         max(1, base["warmup"]), base["iters"], [name])
        except Exception as exc:
            traceback.print_exc()
            failures[f"attention {name}"] = _one_line(exc)
            continue
        reference = [r for r in found if r["bias"] == "none"]
        rows += [r for r in found if r["bias"] != "none"] + ([] if any(r["bias"] == "none" for r in rows) else reference)
    return sorted(rows, key=lambda r: r["bias"] == "none")  # the reference line last


def _figures_from(report: dict[str, Any], figures: dict[str, Any]) -> None:
    """The targets' figures from the report so far: the best DiffiT training row against the DiT row."""
    dit = [r for r in report["train"] if r["backbone"] == "dit"]
    mine = [r for r in report["train"] if r["backbone"] != "dit"]
    best = max(mine, key=lambda r: r["img_per_s"])
    biased = [r for r in report["attention"] if r["bias"] != "none"]
    best_attention = min(biased, key=lambda r: r["ratio_to_reference"]) if biased else None
    ddpm = report["sampling"][0]
    figures.update(
        best_backend=best["backend"],
        train_img_per_s_ratio=best["img_per_s"] / dit[0]["img_per_s"] if dit else None,
        diffit_mfu=best["mfu"], dit_mfu=dit[0]["mfu"] if dit else None,
        peak_memory_ratio=best["peak_memory_bytes"] / dit[0]["peak_memory_bytes"] if dit else None,
        attention_best_bias_ratio=best_attention["ratio_to_reference"] if best_attention else None,
        attention_best_bias_backend=f"{best_attention['backend']} ({best_attention['bias']})" if best_attention else None,
        ddpm_img_per_s=ddpm["img_per_s"], ddpm_sampler=f"{ddpm['sampler']} x{ddpm['steps']} guidance {ddpm['guidance_scale']:g}",
    )
    if report.get("sampling_dpm"):
        figures.update(dpm_img_per_s=report["sampling_dpm"][0]["img_per_s"],
                       dpm_sampler=f"dpm_solver++ x{report['sampling_dpm'][0]['steps']}")


def _save_partial(ctx: dict[str, Any], figures: dict[str, Any]) -> None:
    """The figures so far, as the part's record (replaced by the final one when the part ends)."""
    path = Path(ctx["out"]) / "parts" / "bench.json"
    path.write_text(json.dumps({"part": "bench", "status": "partial", "figures": figures, "checks": []}, default=str))


PART_FUNCTIONS = {"environment": part_environment, "cuda_tests": part_cuda_tests, "triton_kernels": part_triton_kernels,
                  "compile_block": part_compile_block, "train": part_train, "ddp": part_ddp, "fsdp": part_fsdp,
                  "bench": part_bench}


def run_part(name: str, ctx: dict[str, Any]) -> int:
    """The child process of one part: run it, write ``parts/<name>.json``."""
    checks = Checks()
    start = time.perf_counter()
    record: dict[str, Any] = {"part": name}
    try:
        if name in os.environ.get(RAISE_ENV, "").split(","):
            raise RuntimeError(f"failure injected through {RAISE_ENV}")
        figures = PART_FUNCTIONS[name](ctx, checks)
        failed = [c for c in checks.items if not c["ok"]]
        record.update(status="fail" if failed else "pass", figures=figures,
                      reason="; ".join(f"{c['name']}: {c['detail']}" for c in failed)[:500] or None)
    except Exception as exc:
        traceback.print_exc()
        failed = [c for c in checks.items if not c["ok"]]
        record.update(status="error", reason=_one_line(exc), figures={})
    record.update(checks=checks.items, seconds=round(time.perf_counter() - start, 2))
    path = Path(ctx["out"]) / "parts" / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, default=str))
    return 0 if record["status"] == "pass" else 1


# == the orchestrator ===============================================================================


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _numbers(value: Any):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _read_part(out: str | Path, name: str) -> dict[str, Any] | None:
    path = Path(out) / "parts" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_dependencies() -> list[dict[str, Any]]:
    """Each dependency: installed (found, not imported) and its version, the parts that need it and,
    when missing, how to bring it onto a machine without internet."""
    rows = []
    for dist, module, parts in DEPENDENCIES:
        found = importlib.util.find_spec(module) is not None
        hint = None
        if not found:
            hint = (f"on a machine with internet: pip download --no-deps --only-binary=:all: --python-version "
                    f"{sys.version_info.major}.{sys.version_info.minor} -d wheels {dist}"
                    f"{' pydantic-core annotated-types typing-inspection' if dist == 'pydantic' else ''}"
                    f"{' contourpy cycler fonttools kiwisolver pyparsing python-dateutil six' if dist == 'matplotlib' else ''}"
                    f"{' iniconfig' if dist == 'pytest' else ''}; carry wheels/ here; then "
                    f"pip install --no-deps wheels/*.whl (or pass --wheels wheels)")
        rows.append({"distribution": dist, "module": module, "installed": found, "version": _version(dist),
                     "needed_by": list(parts), "hint": hint})
    return rows


#: Put on the path of every process when the project is not installed: what the installed package
#: maps (``plugins/`` as ``diffit_plugins``, ``recipes/`` as ``diffit_toolkit.recipes``), as
#: setuptools' editable finder does.
SOURCE_TREE_FINDER = """import importlib.abc, importlib.util, sys
from pathlib import Path

_MAPPED = {"diffit_plugins": Path(%r) / "plugins", "diffit_toolkit.recipes": Path(%r) / "recipes"}


class _SourceTree(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = _MAPPED.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])


sys.meta_path.insert(0, _SourceTree())
"""


def gather_wheels(folder: Path, python: str, names: tuple[str, ...] = GPU_WHEELS) -> int:
    """Download (here, where pip reaches an index) the wheels of ``names`` at the versions installed
    here, for CPython ``python`` on x86-64 Linux, into ``folder`` (carry it; ``--wheels`` installs it)."""
    pins = [f"{name}=={md.version(name)}" for name in names]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", *[a for p in WHEEL_PLATFORMS for a in ("--platform", p)], "-d", str(folder), *pins]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-2000:], proc.stderr[-2000:], flush=True)
    return proc.returncode


def install_wheels(folder: Path, out: Path) -> Path | None:
    """``pip install --no-deps --target`` of every wheel in ``folder`` into ``out/_site`` (put first
    on the path of this process and of the parts); ``None`` when it fails (said in one line)."""
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    target = out / "_site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", str(target), *wheels], capture_output=True, text=True)
    if proc.returncode != 0 or not wheels:
        said = (proc.stderr.strip().splitlines() or ["no wheels in the folder"])[-1]
        print(f"could not install the wheels of {folder}: {said}", flush=True)
        return None
    print(f"installed {len(wheels)} wheels into {target}", flush=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return target


def _source_tree_env(out: Path) -> dict[str, str]:
    """The environment of the part processes: when the project is not installed, the source tree
    on ``PYTHONPATH`` and a ``sitecustomize`` that maps ``diffit_plugins`` and
    ``diffit_toolkit.recipes`` (what ``pip install -e .`` would)."""
    env = dict(os.environ)
    if importlib.util.find_spec("diffit_plugins") is None:
        shim = out / "_source_tree"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "sitecustomize.py").write_text(SOURCE_TREE_FINDER % (str(ROOT), str(ROOT)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(shim), env.get("PYTHONPATH")]))
        print(f"diffit-toolkit is not installed: running from the source tree {ROOT}", flush=True)
    return env


def _launch(name: str, args: argparse.Namespace, env: dict[str, str], timeout: float) -> dict[str, Any]:
    out = Path(args.out)
    log = (out / "logs" / f"{name}.log").open("w")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--device", args.device, "--out", str(out),
           "--work", args.work,
           "--part-timeout", str(timeout), *(["--tiny"] if args.tiny else [])]
    part_env = dict(env)
    if name == "triton_kernels" and args.device == "cpu":
        part_env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")  # Triton's CPU interpreter
    if args.tiny:
        part_env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=part_env, start_new_session=True)
    return {"name": name, "proc": proc, "log": log, "start": time.monotonic(), "timeout": timeout}


def _finish(job: dict[str, Any], out: Path, timed_out: bool) -> dict[str, Any]:
    name, proc = job["name"], job["proc"]
    if timed_out:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the part and everything it started (torchrun, pytest)
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
    job["log"].close()
    seconds = round(time.monotonic() - job["start"], 2)
    log_lines = [line for line in (out / "logs" / f"{name}.log").read_text(errors="replace").splitlines() if line.strip()]
    last = log_lines[-1].strip()[:200] if log_lines else ""
    record = _read_part(out, name)
    if timed_out:
        partial = record or {}
        record = {"part": name, "status": "timeout", "figures": partial.get("figures", {}),
                  "checks": partial.get("checks", []),
                  "reason": f"timed out after {job['timeout']:.0f} s" + (f" (last output: {last})" if last else "")}
    elif record is None or record.get("status") == "partial":
        kept = " after partial results" if record else " and no result"
        record = {"part": name, "status": "error", "figures": (record or {}).get("figures", {}), "checks": [],
                  "reason": f"exited with code {proc.returncode}{kept}" + (f": {last}" if last else "")}
    record.update(seconds=seconds, timeout_s=job["timeout"])
    print(f"[{seconds:6.1f}s] {name}: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else ""),
          flush=True)
    return record


def _run_jobs(names: list[str], args, env, timeouts: dict[str, float], jobs: int, results: dict[str, Any]) -> None:
    out = Path(args.out)
    pending, running = list(names), []
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            running.append(_launch(name, args, env, timeouts[name]))
        time.sleep(0.2)
        for job in list(running):
            over = time.monotonic() - job["start"] > job["timeout"]
            if job["proc"].poll() is not None or over:
                running.remove(job)
                results[job["name"]] = _finish(job, out, timed_out=over and job["proc"].poll() is None)


def evaluate_targets(bench: dict[str, Any] | None, tiny: bool, device_name: str) -> list[dict[str, Any]]:
    figures = (bench or {}).get("figures", {})
    rows = []
    for name, key, op, threshold, unit, what in TARGETS:
        value = figures.get(key)
        row = {"target": name, "what": what, "value": value, "op": op, "threshold": threshold, "unit": unit}
        if value is None or not _finite(value):
            row.update(status="fail" if not tiny else "n/a",
                       reason=f"not measured: bench {bench['status'] if bench else 'did not run'}"
                       + (f" ({bench.get('reason')})" if bench and bench.get("reason") else "")
                       if value is None else f"not finite: {value}")
        else:
            met = value >= threshold if op == ">=" else value <= threshold
            row["met"] = met
            if tiny:
                row.update(status="n/a", reason="the targets are for DiffiT-XL/2 at 256 px on an H100; this is the tiny run")
            else:
                unit_ = f" {unit}" if unit else ""
                row.update(status="pass" if met else "fail",
                           reason=None if met else f"{value:.3g}{unit_} is not {op} {threshold:g}{unit_}")
                if "H100" not in device_name:
                    row["note"] = f"measured on {device_name}; the targets are set for an H100"
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"**{meta['device_name']}**, torch {meta['versions'].get('torch')}, CUDA {meta['versions'].get('cuda')}, "
             f"triton {meta['versions'].get('triton')}; {'tiny mode' if meta['tiny'] else 'full size'}, "
             f"{meta['wall_s']:.0f} s in all.", "",
             "| part | status | seconds | reason |", "|---|---|---|---|"]
    for name, part in result["parts"].items():
        lines.append(f"| {name} | {part['status']} | {_fmt(part.get('seconds'), 1)} | {part.get('reason') or ''} |")
    lines += ["", "| target | measured | needed | status |", "|---|---|---|---|"]
    for row in result["targets"]:
        value = row["value"]
        shown = "n/a" if value is None else (f"{100 * value:.1f} %" if row["target"] == "mfu" else f"{_fmt(value)} {row['unit']}")
        need = f"{100 * row['threshold']:.0f} %" if row["target"] == "mfu" else f"{row['threshold']:g} {row['unit']}"
        lines.append(f"| {row['what']} | {shown.strip()} | {row['op']} {need.strip()} | {row['status']} |")
    report = result["parts"].get("bench", {}).get("figures", {}).get("report")
    if report:
        model = report["meta"]["model"]
        mine = f"{model['backbone']}:{model['preset']}" if model.get("preset") else model["label"]
        lines += ["", "| model | backend | compile | img/s | step ms | MFU | peak mem GiB |", "|---|---|---|---|---|---|---|"]
        for row in report["train"]:
            mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f} %"
            label = row["model"] if row["backbone"] == "dit" else mine
            lines.append(f"| {label} ({row['mechanism']}) | {row['backend']} | {'yes' if row['compile'] else 'no'} | "
                         f"{row['img_per_s']:.1f} | {row['step_ms']:.1f} | {mfu} | {row['peak_memory_bytes'] / 2**30:.2f} |")
        if report["attention"]:
            lines += ["", "| attention backend | bias | ms (fwd + bwd) | x sdpa without bias |", "|---|---|---|---|"]
            for row in report["attention"]:
                lines.append(f"| {row['backend']} | {row['bias']} | {row['ms']:.3f} | {row['ratio_to_reference']:.2f} |")
        lines += ["", "| model | sampler | batch | img/s |", "|---|---|---|---|"]
        for row in report["sampling"] + report.get("sampling_dpm", []):
            label = row["model"] if row["model"].startswith("dit") else mine
            lines.append(f"| {label} | {row['sampler']} x{row['steps']}, guidance {row['guidance_scale']:g} | "
                         f"{row['batch']} | {row['img_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def orchestrate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out = Path(args.out).resolve()
    args.out = str(out)
    work = Path(args.work or out).resolve()
    args.work = str(work)
    for folder in ("parts", "logs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for stale in (out / "parts").glob("*.json"):
        stale.unlink()
    site = install_wheels(Path(args.wheels), out) if args.wheels else None
    try:
        work.mkdir(parents=True, exist_ok=True)
        write_synthetic_data(work)
        write_recipe(work)
    except Exception as exc:  # the parts that train say so
        print(f"could not write the synthetic data: {_one_line(exc)}", flush=True)
    deps = check_dependencies()
    for row in deps:
        if not row["installed"] and row["needed_by"]:
            print(f"missing {row['distribution']} (needed by {', '.join(row['needed_by'])}): {row['hint']}", flush=True)
    env = _source_tree_env(out)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    names = [p for p in PARTS if not args.parts or p in args.parts.split(",")]
    timeouts = {p: float(PARTS[p][2] if args.tiny else PARTS[p][1]) for p in names}
    for item in args.timeout or []:
        part, _, seconds = item.partition("=")
        timeouts[part] = float(seconds)
    results: dict[str, Any] = {}
    missing = {row["distribution"]: row for row in deps if not row["installed"]}
    runnable = []
    for name in names:
        needs_cuda = PARTS[name][0]
        lacking = [d for d, row in missing.items() if name in row["needed_by"]]
        if needs_cuda and args.device != "cuda":
            results[name] = {"part": name, "status": "skip", "reason": "needs a CUDA device", "figures": {}, "checks": []}
        elif lacking and name != "triton_kernels":
            results[name] = {"part": name, "status": "skip", "figures": {}, "checks": [],
                             "reason": f"needs {', '.join(lacking)}, not installed (see dependencies)"}
        else:
            runnable.append(name)
    for name, record in results.items():
        print(f"[   0.0s] {name}: skip ({record['reason']})", flush=True)
    phase1 = sorted((n for n in runnable if PARTS[n][3] == 1), key=START_ORDER.index)
    phase2 = [n for n in runnable if PARTS[n][3] == 2]
    _run_jobs(phase1, args, env, timeouts, args.jobs, results)
    for name in phase2:  # timings: alone, within what is left of the budget
        left = args.budget - (time.monotonic() - started) - 5
        if left < 10:
            results[name] = {"part": name, "status": "skip", "figures": {}, "checks": [],
                             "reason": f"no time left in the {args.budget:.0f} s budget"}
            continue
        timeouts[name] = min(timeouts[name], left)
        _run_jobs([name], args, env, timeouts, 1, results)
    environment = results.get("environment", {}).get("figures", {})
    device_name = environment.get("device_name", args.device)
    parts = {name: results[name] for name in names}
    targets = evaluate_targets(parts.get("bench"), args.tiny, device_name)
    failures = [{"part": n, "status": p["status"], "reason": p.get("reason")} for n, p in parts.items()
                if p["status"] in ("fail", "error", "timeout")]
    failures += [{"target": t["target"], "status": t["status"], "reason": t["reason"]} for t in targets if t["status"] == "fail"]
    result = {
        "meta": {"device": args.device, "device_name": device_name, "tiny": args.tiny,
                 "command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (time.monotonic() - started))),
                 "wall_s": round(time.monotonic() - started, 1), "budget_s": args.budget,
                 "versions": {"python": platform.python_version(), "torch": environment.get("torch") or _version("torch"),
                              "cuda": environment.get("cuda"), "triton": _version("triton"),
                              **{k: v for k, v in environment.get("versions", {}).items() if k not in ("torch", "triton")}},
                 "environment": environment},
        "dependencies": deps,
        "parts": parts,
        "targets": targets,
        "failures": failures,
    }
    (out / "acceptance.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "acceptance.md").write_text(markdown(result))
    print(f"wrote {out / 'acceptance.json'} and {out / 'acceptance.md'} ({result['meta']['wall_s']:.0f} s)", flush=True)
    for failure in failures:
        print(f"FAILED {failure.get('part') or failure.get('target')}: {failure['reason']}", flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes and a few steps (the CPU check of this script)")
    parser.add_argument("--out", default=None, help="output folder (default: acceptance_<device>[_tiny])")
    parser.add_argument("--work", default=None, help="folder of the data and the run folders with their checkpoints "
                        "(default: --out; about 1 GB on a GPU)")
    parser.add_argument("--parts", default=None, help=f"comma-separated subset of: {', '.join(PARTS)}")
    parser.add_argument("--timeout", action="append", metavar="PART=SECONDS", help="override one part's timeout")
    parser.add_argument("--budget", type=float, default=480.0, help="wall-clock seconds for everything (default 480)")
    parser.add_argument("--jobs", type=int, default=None, help="correctness parts at once (default: all on CUDA, 2 on CPU)")
    parser.add_argument("--wheels", default=None, help="install the wheels in this folder first (pip --no-deps "
                        "--target OUT/_site, put first on the path)")
    parser.add_argument("--gather-wheels", default=None, metavar="FOLDER",
                        help="only download, here, the wheels a GPU machine lacks (pydantic and its needs) into FOLDER")
    parser.add_argument("--for-python", default="3.12", help="the GPU machine's Python for --gather-wheels (3.12)")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--dist-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out or f"acceptance_{args.device}{'_tiny' if args.tiny else ''}"
    args.jobs = args.jobs or (len(PARTS) if args.device == "cuda" else 2)
    if args.gather_wheels:
        return gather_wheels(Path(args.gather_wheels), args.for_python)
    if args.dist_worker:
        return dist_worker(args.dist_worker, args.device, args.out, args.work, args.tiny)
    if args.part:
        ctx = {"device": args.device, "tiny": args.tiny, "out": args.out, "work": args.work, "timeout": args.part_timeout,
               "started": time.perf_counter()}
        return run_part(args.part, ctx)
    unknown = [p for p in (args.parts or "").split(",") if p and p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
