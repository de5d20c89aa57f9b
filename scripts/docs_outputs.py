"""The command outputs quoted in the docs, produced by running the commands.

A quoted output sits between two markers in a page of docs/:

    <!-- output: KEY -->

    ```console
    $ the command
    what it printed
    ```

    <!-- /output -->

(lines wider than a code block, 90 columns, are folded at spaces). KEY names an entry of OUTPUTS below: the commands (shown with ``$``, run exactly as shown, from
a scratch folder in which ``runs/`` points to this checkout's ``runs/``) or, for a generated
table, a function. ``python scripts/docs_outputs.py`` rewrites every block from a fresh run;
``--check`` compares instead and exits 1 naming each block that differs (the docs test runs the
check for the cheap entries). Entries that sample a trained model need its run folder: they
are checked or rewritten only when it is there (``--with-runs``); the page states the command.

    python scripts/docs_outputs.py --check             # the cheap entries (seconds)
    python scripts/docs_outputs.py --with-runs         # also those that need runs/quickstart
    python scripts/docs_outputs.py --slow              # also those that take minutes of CPU

With ``--with-runs`` the quickstart figures of the docs (the labelled sample grid and the loss
curve in docs/images/) are made again from ``runs/quickstart``, which
``diffit-toolkit train recipes/quickstart.yaml`` writes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
WIDTH = 90  # terminal width for rich tables: fits a code block at 1280 px

BLOCK = re.compile(r"(<!-- output: (?P<key>[\w.-]+) -->\n)(?P<body>(?:.*?\n)?)(<!-- /output -->)", re.S)


@dataclass(frozen=True)
class Output:
    """One quoted output: the commands that print it, or a function that makes it."""

    commands: tuple[str, ...] = ()
    make: Callable[[], str] | None = None
    needs: tuple[str, ...] = field(default=())  # paths (relative to the checkout) the commands read
    raw: bool = False  # the output is Markdown (a table) to show as it is, not a console block
    slow: bool = False  # minutes of CPU: checked with --slow, not in the test suite

    def available(self) -> bool:
        return all((ROOT / need).exists() for need in self.needs)


def fold(line: str) -> list[str]:
    """A line longer than the page's code width, folded at spaces as a terminal of that width
    would show it (continuations indented two more columns)."""
    if len(line) <= WIDTH:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.wrap(line, WIDTH, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def fold_command(command: str) -> list[str]:
    """``$ command``, continued with backslashes over lines of at most WIDTH columns."""
    words: list[str] = []
    for word in command.split(" "):  # an option and its value stay on one line
        if words and words[-1].startswith("--") and " " not in words[-1] and not word.startswith("-"):
            words[-1] += " " + word
        else:
            words.append(word)
    lines, line = [], "$"
    for word in words:
        if len(line) + 1 + len(word) + 2 > WIDTH and line not in ("$", "   "):
            lines.append(line + " \\")
            line = "   "
        line += " " + word
    return [*lines, line]


def run_commands(commands: tuple[str, ...], raw: bool = False) -> str:
    """Run each command as shown, in a scratch folder with runs/ and recipes/ linked in."""
    env = {**os.environ, "COLUMNS": str(WIDTH), "NO_COLOR": "1", "TERM": "dumb"}
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("runs", "recipes", "docs"):
            if (ROOT / name).exists():
                os.symlink(ROOT / name, Path(tmp) / name)
        for command in commands:
            proc = subprocess.run(shlex.split(command), cwd=tmp, env=env, capture_output=True, text=True,
                                  timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"`{command}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
            if raw:
                lines += [line.rstrip() for line in proc.stdout.strip().splitlines()]
                continue
            lines += fold_command(command)
            lines += [wrapped for line in proc.stdout.rstrip().splitlines() for wrapped in fold(line.rstrip())]
    return "\n".join(lines) if raw else "```console\n" + "\n".join(lines) + "\n```"


def mechanism_parameters() -> dict[str, tuple[int, int]]:
    """Parameters each mechanism adds to one block: at the quickstart's size and at XL's.

    Quickstart: width 96, 4 heads, the 4 x 4 token grid of 8 x 8 digits in 2 x 2 patches, a
    global relative bias (``recipes/quickstart.yaml``). XL: width 1152, 16 heads, the 16 x 16
    grid of DiffiT-XL/2 at 256 px, global relative bias. Counted: the block's parameters beyond
    the norms, attention and MLP every block has (the mechanism's own, and a layer it asks the block
    for, such as a cross-attention); not a module shared by all blocks of a backbone.
    """
    import torch
    import yaml

    from diffit_toolkit.nn.block import BlockSpec, DiffiTBlock
    from diffit_toolkit.registry import conditioning

    model = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["model"]
    side = model["input_size"] // model["patch_size"]
    quick = BlockSpec(dim=model["hidden_size"], num_heads=model["num_heads"], cond_dim=model["hidden_size"],
                      grid=(side, side), rel_pos_bias=model["rel_pos_bias"])
    xl = BlockSpec(dim=1152, num_heads=16, cond_dim=1152, grid=(16, 16), rel_pos_bias=True)
    plain = ("norm1", "attn", "norm2", "mlp")  # what every block has; the rest is the mechanism's
    counts = {}
    for name in conditioning.names():
        with torch.device("meta"):
            blocks = [DiffiTBlock(spec, name) for spec in (quick, xl)]
        counts[name] = tuple(sum(p.numel() for n, p in block.named_parameters() if n.split(".")[0] not in plain)
                             for block in blocks)
    return counts


MECHANISMS = {  # name: (sites, the layer that reads the conditioning token)
    "tmsa": ("`qkv`", "`qkv_temb`: Linear(cond, 3D)"),
    "window_tmsa": ("`qkv` (+ windowed attention)", "same as `tmsa`"),
    "adaln_zero": ("shifts, scales, gates", "`adaLN_modulation`: SiLU, Linear(cond, 6D)"),
    "relative_bias": ("`bias_table`", "`bias_temb`: Linear(cond, T * heads)"),
    "mlp": ("`mlp_in`", "`mlp_temb`: Linear(cond, D)"),
    "separate_token": ("`extra_tokens`", "`token_temb`: Linear(cond, D)"),
    "additive": ("`tokens`", "`add_temb`: Linear(cond, D), `gamma` (D)"),
    "cross_attention": ("`context`", "`cross_attn` (block's): q, kv, proj on [t, y]"),
    "in_context": ("`sequence`", "none (`proj`: Linear(cond, D) where widths differ)"),
    "adaln": ("shifts, scales", "`adaLN_modulation`: SiLU, Linear(cond, 4D)"),
    "adaln_single": ("shifts, scales, gates", "`scale_shift_table` (6, D); shared: Linear(cond, 6D)"),
}


def mechanism_table() -> str:
    """The mechanisms table of docs/mechanisms.md with the parameter counts of the toolkit."""
    counts = mechanism_parameters()
    missing = sorted(set(counts) - set(MECHANISMS))
    if missing:
        raise SystemExit(f"registered mechanisms without a row in MECHANISMS: {missing}")
    rows = ["| name | sites | layer | parameters, quickstart | parameters, XL |",
            "|---|---|---|---:|---:|"]
    for name, (sites, layer) in MECHANISMS.items():
        quick, xl = counts[name]
        rows.append(f"| `{name}` | {sites} | {layer} | {quick:,} | {xl / 1e6:.2f} M |")
    return "\n".join(rows)


OUTPUTS: dict[str, Output] = {
    "mechanism-parameters": Output(make=mechanism_table),
    "quick-tour": Output(commands=("python docs/examples/quick_tour.py",)),
    "recipe-validate": Output(commands=("diffit-toolkit recipe validate recipes/diffit_latent.yaml",)),
    "model-info-xl2": Output(commands=("diffit-toolkit model-info -b latent_diffit -p XL/2",)),
    "exact-samplers": Output(commands=("python -m diffit_toolkit.sampling.exact_report",), raw=True, slow=True),
    "eval-quickstart": Output(commands=("diffit-toolkit eval runs/quickstart --num 1000",),
                              needs=("runs/quickstart/checkpoints",)),
    "eval-guidance-sweep": Output(commands=("diffit-toolkit eval runs/quickstart --guidance-scales 1,1.5,2,3 "
                                            "--num 1000 --plot guidance.png --csv guidance.csv",),
                                  needs=("runs/quickstart/checkpoints",)),
    "eval-digits-npz": Output(commands=("diffit-toolkit sample runs/quickstart --npz samples.npz --num 200",
                                        "diffit-toolkit eval samples.npz"),
                              needs=("runs/quickstart/checkpoints",)),
}


def quickstart_figures() -> list[Path]:
    """The quickstart run's sample grid with its rows labelled and at twice the size (nearest
    neighbour, so the digits' pixels stay sharp), and its loss curve, into docs/images/."""
    from PIL import Image, ImageDraw, ImageFont

    run = ROOT / "runs" / "quickstart"
    grid = Image.open(run / "samples.png").convert("RGB")
    rows = 10  # one row per digit class, 0 to 9 (the recipe's 100 samples, classes in order)
    scale, margin = 2, 44
    big = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    out = Image.new("RGB", (big.width + margin, big.height), "white")
    out.paste(big, (margin, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=28)
    for row in range(rows):
        y = (row + 0.5) * big.height / rows
        draw.text((margin / 2, y), str(row), fill="black", font=font, anchor="mm")
    images = ROOT / "docs" / "images"
    out.save(images / "quickstart_samples.png", optimize=True)
    (images / "quickstart_loss.png").write_bytes((run / "loss.png").read_bytes())
    return [images / "quickstart_samples.png", images / "quickstart_loss.png"]


def produce(key: str) -> str:
    entry = OUTPUTS[key]
    return entry.make() if entry.make is not None else run_commands(entry.commands, raw=entry.raw)


def blocks(page: Path) -> list[str]:
    return [m["key"] for m in BLOCK.finditer(page.read_text())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write; exit 1 on a difference")
    parser.add_argument("--with-runs", action="store_true",
                        help="also the entries that sample a trained run (when its folder is there)")
    parser.add_argument("--slow", action="store_true", help="also the entries that take minutes of CPU")
    parser.add_argument("--only", action="append", default=[], help="only this key (repeatable)")
    args = parser.parse_args(argv)

    failures, done = [], 0
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        for key in blocks(page):
            if key not in OUTPUTS:
                failures.append(f"{page.relative_to(ROOT)}: unknown output key {key!r}")
                continue
            entry = OUTPUTS[key]
            if (args.only and key not in args.only) or (entry.needs and not (args.with_runs and entry.available())) \
                    or (entry.slow and not args.slow):
                continue
            body = produce(key)
            new = BLOCK.sub(lambda m, key=key, body=body: m.group(0) if m["key"] != key
                            else f"{m.group(1)}\n{body}\n\n{m.group(4)}", text)
            done += 1
            if new != text:
                if args.check:
                    failures.append(f"{page.relative_to(ROOT)}: output {key!r} differs from a fresh run; "
                                    f"run python scripts/docs_outputs.py --only {key}")
                else:
                    text = new
                    page.write_text(text)
                    print(f"updated {page.relative_to(ROOT)}: {key}")
    if args.with_runs and not args.check and not args.only and (ROOT / "runs" / "quickstart" / "samples.png").exists():
        for path in quickstart_figures():
            print(f"updated {path.relative_to(ROOT)} from runs/quickstart")
    for failure in failures:
        print(failure, file=sys.stderr)
    print(f"{done} output block(s) {'checked' if args.check else 'produced'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
