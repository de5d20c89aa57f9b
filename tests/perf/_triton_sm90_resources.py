"""Compile the Triton attention kernels ahead of time for an H100 (sm_90) on a machine without a
GPU, and print each kernel's registers, register spills and shared memory.

No GPU is needed: Triton lowers to PTX and runs its bundled ``ptxas``, whose ``-v`` report gives the
registers and spills. What this shows is whether a tile configuration compiles, spills
or overflows shared memory on the real backend (the interpreter checks only the arithmetic); it
says nothing about speed.

    python tests/perf/_triton_sm90_resources.py             # the default configurations
    python tests/perf/_triton_sm90_resources.py --sweep     # tiles x warps x stages at d 72

Pointer arguments are declared 16-byte aligned and unit strides constant, as Triton's launcher
specialises them; the other integers are left unspecialised (a launch may add divisibility hints).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import diffit_plugins.triton_attention as ta

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_PTRS = {"lse_ptr", "delta_ptr", "table_ptr", "bias_ptr", "dbias_ptr"}


def signature(fn, dtype: str) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            sig[name] = "*i32" if name == "index_ptr" else "*fp32" if name in FLOAT_PTRS else f"*{dtype}"
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def resources(kernel: str, d0: int, d1: int, block_m: int, block_n: int, warps: int, stages: int,
              dtype: str = "bf16", mode: int = 2) -> dict[str, int | str]:
    """Compile one kernel for sm_90; registers, spill bytes (stores, loads), stack frame and shared bytes."""
    fn = {"fwd": ta._fwd_kernel, "dkdv": ta._bwd_dkdv_kernel, "dq": ta._bwd_dq_kernel}[kernel]
    consts = dict(BIAS_MODE=mode, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D0=d0, BLOCK_D1=d1, PRECISION="tf32")
    if kernel == "dq":
        consts["BIAS_GRAD"] = True
    # Triton's launcher turns integer arguments equal to 1 into constants: the unit strides of
    # the head dim (q, k, v, dO, and the heads of a contiguous table).
    unit = [n for n in fn.arg_names if n in ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_th")]
    consts.update(dict.fromkeys(unit, 1))
    sig = signature(fn, dtype)
    for name in consts:
        sig[name] = "constexpr"
    names = fn.arg_names
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith("_ptr")}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    row: dict[str, int | str] = dict(kernel=kernel, d=f"{d0}+{d1}" if d1 else str(d0), tile=f"{block_m}x{block_n}",
                                     warps=warps, stages=stages)
    try:
        compiled = triton.compile(src, target=TARGET, options=dict(num_warps=warps, num_stages=stages))
    except Exception as exc:  # e.g. out of shared memory: that is the result
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return row
    # ptxas -v on the PTX Triton produced (the same ptxas and flags family Triton runs) reports
    # registers and the spills that the cubin's resource table folds into its stack frame.
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info)
    if regs is None or spills is None:
        row["error"] = f"ptxas said: {info.strip()[:200]}"
        return row
    row.update(regs=int(regs[1]), stack=int(spills[1]), spill_stores=int(spills[2]), spill_loads=int(spills[3]),
               shared=compiled.metadata.shared)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="tiles x warps x stages at head dim 72")
    args = parser.parse_args()
    if args.sweep:
        configs = [(k, 64, 16, bm, bn, w, s) for k in ("fwd", "dkdv", "dq")
                   for (bm, bn), w, s in itertools.product([(64, 64), (128, 64), (64, 32)], [4, 8], [2, 3])]
    else:  # what the launcher uses on CUDA: d 72 (split), d 64, and d 72 padded to 128 for comparison
        configs = [(k, *ta._blocks(d, "cuda")[2:], *ta._blocks(d, "cuda")[:2], *ta.CUDA_WARPS_STAGES[k])
                   for d in (72, 64) for k in ("fwd", "dkdv", "dq")]
        configs += [(k, 128, 0, 64, 64, *ta.CUDA_WARPS_STAGES[k]) for k in ("fwd", "dkdv", "dq")]
    print("kernel d tile warps stages regs spill_store_bytes spill_load_bytes shared_bytes", flush=True)
    ok = True
    for config in configs:
        row = resources(*config)
        if "error" in row:
            print(row["kernel"], row["d"], row["tile"], row["warps"], row["stages"], "ERROR", row["error"], flush=True)
            ok = False
            continue
        print(*(row[k] for k in ("kernel", "d", "tile", "warps", "stages", "regs", "spill_stores", "spill_loads",
                                 "shared")), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
