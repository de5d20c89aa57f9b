"""Peak memory of ``diffit-toolkit sample --npz`` for 1,000 and 10,000 images at 64x64.

Builds a tiny unconditional 64x64 DiT (one block, width 32, random weights), saves it with
``save_pretrained`` and samples it in a fresh process per count (1 DDIM step, batch 250), reading
the child's peak resident memory from ``getrusage``. The images are written to the ``.npz`` as
uint8 one batch at a time, so the peak should not grow with the count.

    python benchmarks/sample_memory.py [--counts 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = {"diffusion": {"process": "gaussian", "learn_sigma": False}, "sample": {"sampler": "ddim", "steps": 1}}

CHILD = """
import resource, sys
from diffit_toolkit.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    code = exit.code or 0
else:
    code = 0
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args()

    import torch
    import yaml

    from diffit_toolkit.registry import backbones

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        model = backbones.build("dit", None, input_size=64, in_channels=3, patch_size=8, hidden_size=32, depth=1,
                                num_heads=2, num_classes=0)
        model.save_pretrained(folder / "tiny64")
        (folder / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
        rows = []
        for count in args.counts:
            npz = folder / f"s{count}.npz"
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", CHILD, "sample", str(folder / "tiny64"), "--recipe", str(folder / "recipe.yaml"),
                 "--num", str(count), "--batch-size", str(args.batch_size), "--device", "cpu", "--npz", str(npz)],
                capture_output=True, text=True, check=False,
            )
            seconds = time.perf_counter() - start
            if out.returncode != 0:
                sys.exit(f"sampling {count} images failed: {out.stdout[-500:]}{out.stderr[-500:]}")
            peak_kb = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK_KB")))
            rows.append({"images": count, "peak_rss_mib": round(peak_kb / 1024, 1), "npz_mib": round(npz.stat().st_size / 2**20, 1),
                         "seconds": round(seconds, 1)})
            npz.unlink()
    print(f"{'images':>8} {'peak RSS (MiB)':>15} {'.npz (MiB)':>11} {'seconds':>8}")
    for r in rows:
        print(f"{r['images']:>8} {r['peak_rss_mib']:>15} {r['npz_mib']:>11} {r['seconds']:>8}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
