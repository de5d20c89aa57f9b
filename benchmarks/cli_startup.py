"""Start-up time of the ``diffit-toolkit`` command line: the median wall-clock time of a few
commands, each run ``--repeat`` times in a fresh interpreter.

    python benchmarks/cli_startup.py [--repeat 5]

Prints one line per command, e.g. ``--help  median 0.41 s  (5 runs: 0.39 ... 0.52 s)``, and which
heavy modules (torch, timm, torchvision, diffusers) each command imported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["--version"], ["recipe", "show", "quickstart"], ["plugins"]]
HEAVY = ("torch", "timm", "torchvision", "diffusers")

# the command line's own entry point, plus a report of the heavy modules it left imported
PROBE = """
import json, sys
from diffit_toolkit.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    sys.stderr.write("\\nHEAVY " + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)) + "\\n")
"""


def time_command(args: list[str], repeat: int) -> tuple[list[float], list[str]]:
    times, heavy = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "diffit_toolkit", *args], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"diffit-toolkit {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    probe = subprocess.run([sys.executable, "-c", PROBE.format(HEAVY=HEAVY), *args], capture_output=True, text=True)
    for line in probe.stderr.splitlines():
        if line.startswith("HEAVY "):
            heavy = json.loads(line[6:])
    return times, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (default 5)")
    options = parser.parse_args()
    for args in COMMANDS:
        times, heavy = time_command(args, options.repeat)
        print(f"{' '.join(args):<24} median {statistics.median(times):5.2f} s  ({options.repeat} runs: "
              f"{min(times):.2f} ... {max(times):.2f} s)  imports: {', '.join(heavy) or 'none of ' + '/'.join(HEAVY)}",
              flush=True)


if __name__ == "__main__":
    main()
