"""Conformance kit for plugin authors: the properties every conditioning mechanism and every
attention backend must have, checked at toy size with hypothesis.

Call it from a test:

```python
from diffit_toolkit.testing import check_attention_backend, check_mechanism

def test_my_mechanism_conforms():
    check_mechanism(MyMechanism)              # a class, or a registered name

def test_my_backend_conforms():
    check_attention_backend(MY_BACKEND)       # an AttentionBackend, or a registered name
```

A failed property raises [`ConformanceError`][diffit_toolkit.testing.ConformanceError] (an
``AssertionError``) whose message is one
line: the plugin, the property, what went wrong and the first failing case, e.g.
``conditioning mechanism 'MixesBatch': batch independence failed: output of sample 1 changed by
9.6e-01 when only sample 0 changed [dim=4 heads=1 cond_dim=4 grid=2x2 window=None bias=False
batch=2 seed=0]``. A passing check returns a
[`ConformanceReport`][diffit_toolkit.testing.ConformanceReport] listing what was checked
and what was skipped, with the reason (e.g. a backend with no backward pass on this device).

As a pytest plugin (``pytest_plugins = ["diffit_toolkit.testing"]`` in your root
``conftest.py``, or ``pytest -p diffit_toolkit.testing``), a test that takes an argument named
``conditioning_name`` or ``attention_backend_name`` runs once per registered name:

```python
def test_every_mechanism(conditioning_name):
    check_mechanism(conditioning_name)
```

The kit needs the test dependencies (``pip install "diffit-toolkit[dev]"``: pytest, hypothesis).
Call the checks from a plain test function, not from inside a hypothesis ``@given`` test. The
kit raises its own messages, so pytest need not rewrite its asserts (PYTEST_DONT_REWRITE).
"""

from __future__ import annotations

import contextlib
import dataclasses
import unittest
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffit_toolkit.optional import require

require("hypothesis", "the conformance kit (diffit_toolkit.testing)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (checked just above)
from hypothesis import strategies as st  # noqa: E402

from diffit_toolkit.nn.attention import Attention, AttentionBackend, BackendChoice, attention_math
from diffit_toolkit.nn.block import (
    BlockSpec,
    Conditioning,
    ConditioningMechanism,
    DiffiTBlock,
    SITE_SHAPES,
    Injection,
    resolve_mechanism,
)
from diffit_toolkit.registry import attention_backends, conditioning

__all__ = [
    "ATTENTION_PROPERTIES",
    "DEAD_PARAMETER_STEPS",
    "MECHANISM_PROPERTIES",
    "SITE_SHAPES",
    "ConformanceError",
    "ConformanceReport",
    "check_attention_backend",
    "check_mechanism",
    "pytest_generate_tests",
]

#: Properties [`check_mechanism`][diffit_toolkit.testing.check_mechanism] checks, in order (the last only where the class declares it).
MECHANISM_PROPERTIES: tuple[str, ...] = (
    "output shapes and dtypes",
    "batch independence",
    "conditioning reaches the output",
    "no dead parameters",
    "state_dict round trip",
    "torch.compile",
    "identity at initialisation",
)

#: Properties [`check_attention_backend`][diffit_toolkit.testing.check_attention_backend] checks, in order.
ATTENTION_PROPERTIES: tuple[str, ...] = (
    "kernel equals math",
    "module equals math",
    "batch independence",
    "gradients equal math",
)

#: Hypothesis examples per property (small: the kit runs for every registered plugin in CI).
DEFAULT_EXAMPLES = 4

#: Absolute tolerance against the float64 reference, per input dtype (scaled by max(1, |ref|)).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

#: SGD steps from a fresh block within which every parameter must receive a gradient.
DEAD_PARAMETER_STEPS = 3

#: Tolerance of the float64 block checks (batch independence, round trip): round-off only.
_BLOCK_TOL = 1e-9


class ConformanceError(AssertionError):
    """A plugin fails a conformance property; the message is one line naming both."""


@dataclass(frozen=True)
class ConformanceReport:
    """What a check verified.

    Attributes:
        subject: the plugin, e.g. ``conditioning mechanism 'tmsa'``.
        passed: the properties that held.
        skipped: property -> the reason it could not be checked here.
    """

    subject: str
    passed: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _settings(max_examples: int) -> settings:
    # Inherits the active hypothesis profile (database, derandomize, ...); no deadline, because
    # shared CI machines make timings noisy; the first failure is reported as found (no
    # shrinking: each example builds and runs blocks, and the message names the case anyway).
    return settings(
        max_examples=max_examples,
        deadline=None,
        phases=(Phase.explicit, Phase.reuse, Phase.generate),
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _check_property(
    subject: str, prop: str, strategy: st.SearchStrategy, test: Callable[[Any], None], max_examples: int
) -> None:
    """Run ``test`` on hypothesis examples of ``strategy``; any failure becomes one
    [`ConformanceError`][diffit_toolkit.testing.ConformanceError] line naming ``subject``, ``prop``
    and the case."""

    @_settings(max_examples)
    @given(strategy)
    def run(case: Any) -> None:
        try:
            test(case)
        except _PropertyFailed as failed:
            raise ConformanceError(f"{subject}: {prop} failed: {failed} [{case}]") from None
        except unittest.SkipTest:
            raise
        except Exception as exc:
            raise ConformanceError(f"{subject}: {prop} failed: raised {_one_line(exc)} [{case}]") from exc

    run()


class _PropertyFailed(Exception):
    """Raised inside a property with the detail of the failure (becomes a ConformanceError)."""


def _require(condition: bool, detail: str) -> None:
    if not condition:
        raise _PropertyFailed(detail)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic init without consuming the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --------------------------------------------------------------------------------------------
# Conditioning mechanisms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BlockCase:
    spec: BlockSpec
    batch: int
    seed: int

    def __str__(self) -> str:
        s = self.spec
        window = "None" if s.window is None else f"{s.window[0]}x{s.window[1]}"
        return (
            f"dim={s.dim} heads={s.num_heads} cond_dim={s.cond_dim} grid={s.grid[0]}x{s.grid[1]} "
            f"window={window} bias={s.rel_pos_bias} batch={self.batch} seed={self.seed}"
        )


def _block_cases(cls: type[ConditioningMechanism]) -> st.SearchStrategy[_BlockCase]:
    """Toy block shapes: 1-2 heads of width 4 or 8, 2x2..4x4 grids, global or 2x2 windows."""

    @st.composite
    def draw_case(draw: st.DrawFn) -> _BlockCase:
        heads = draw(st.integers(1, 2))
        grid = (draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4])))
        spec = BlockSpec(
            dim=heads * draw(st.sampled_from([4, 8])),
            num_heads=heads,
            cond_dim=draw(st.sampled_from([4, 8])),
            grid=grid,
            window=draw(st.sampled_from([None, 2])),
            rel_pos_bias=cls.requires_rel_pos_bias or draw(st.booleans()),
            attention_backend="math",
        )
        return _BlockCase(spec, draw(st.integers(2, 3)), draw(st.integers(0, 2**16)))

    return draw_case()


class _Unit(nn.Module):
    """One block as a backbone runs it: ``c`` (B, 2, cond_dim) holds the time and class
    embeddings; the mechanism's shared module (if it declares one) runs on their sum, and tokens
    the block appends to the sequence are dropped from its output."""

    def __init__(self, block: DiffiTBlock, shared: nn.Module | None) -> None:
        super().__init__()
        self.block, self.shared = block, shared

    @property
    def spec(self) -> BlockSpec:
        return self.block.spec

    def mechanism_parameters(self) -> dict[str, nn.Parameter]:
        """The mechanism's parameters, then the shared module's (prefixed ``shared.``)."""
        params = dict(self.block.cond.named_parameters())
        if self.shared is not None:
            params.update({f"shared.{n}": p for n, p in self.shared.named_parameters()})
        return params

    def conditioning(self, c: Tensor) -> Conditioning:
        cond = Conditioning(c[:, 0], c[:, 1])
        return cond if self.shared is None else cond._replace(shared=self.shared(cond.c))

    def injection(self, c: Tensor) -> Injection:
        return self.block.injection(self.conditioning(c))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.block(x, self.conditioning(c))[:, : x.shape[1]]


class _MechanismHarness:
    """Builds blocks of one mechanism and the inputs of a case."""

    def __init__(self, cls: type[ConditioningMechanism], options: dict[str, Any]) -> None:
        self.cls = cls
        self.options = options

    def block(self, case: _BlockCase, dtype: torch.dtype, seed: int | None = None) -> _Unit:
        with _seeded(case.seed if seed is None else seed):
            block = DiffiTBlock(case.spec, self.cls, dict(self.options))
            shared = self.cls.shared_module(block.spec, **self.options)
        return _Unit(block, shared).to(dtype).eval()

    def perturbed_block(self, case: _BlockCase, dtype: torch.dtype) -> _Unit:
        """A block whose parameters are moved off their init (zero inits would hide bugs)."""
        block = self.block(case, dtype)
        g = torch.Generator().manual_seed(case.seed + 1)
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        return block

    @staticmethod
    def inputs(case: _BlockCase, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(case.seed + 2)
        n = case.spec.grid[0] * case.spec.grid[1]
        x = torch.randn(case.batch, n, case.spec.dim, generator=g, dtype=torch.float64)
        c = torch.randn(case.batch, 2, case.spec.cond_dim, generator=g, dtype=torch.float64)  # t and y embeddings
        return x.to(dtype), c.to(dtype)


def _site_shape_ok(site: str, shape: tuple[int, ...], spec: BlockSpec, batch: int) -> bool:
    """Whether ``shape`` matches ``SITE_SHAPES[site]`` for a block of ``spec`` and a batch."""
    n, d = spec.grid[0] * spec.grid[1], spec.dim
    allowed = {
        "(B, 1 or N, D)": len(shape) == 3 and shape[0] == batch and shape[1] in (1, n) and shape[2] == d,
        "(B, 1 or N, 3D)": len(shape) == 3 and shape[0] == batch and shape[1] in (1, n) and shape[2] == 3 * d,
        "(B, T, heads)": shape == (batch, spec.bias_table_size, spec.num_heads),
        "(B, M, D)": len(shape) == 3 and shape[0] == batch and shape[1] >= 1 and shape[2] == d,
        "(B, M, context_dim)": len(shape) == 3 and shape[0] == batch and shape[1] >= 1 and shape[2] == spec.context_dim,
    }
    return allowed[SITE_SHAPES[site]]


def check_mechanism(
    mechanism: str | type[ConditioningMechanism],
    *,
    options: dict[str, Any] | None = None,
    max_examples: int = DEFAULT_EXAMPLES,
    compile_backend: str = "eager",
) -> ConformanceReport:
    """Check that a conditioning mechanism behaves like one; raise on the first failed property.

    The mechanism is built into [`DiffiTBlock`][diffit_toolkit.nn.block.DiffiTBlock] s of toy shapes
    (hypothesis draws widths, heads, grids, windows and the relative bias; a mechanism with
    ``requires_rel_pos_bias`` always gets one) with the ``math`` attention backend, and run as a
    backbone runs them: from random time and class embeddings (given apart to a mechanism that
    ``takes_parts``, summed otherwise), through the mechanism's shared module when it declares
    one, with tokens appended to the sequence dropped from the output. Properties, in order (see [`MECHANISM_PROPERTIES`][diffit_toolkit.testing.MECHANISM_PROPERTIES]):

    * **output shapes and dtypes**: ``forward(c)`` returns an
      [`Injection`][diffit_toolkit.nn.block.Injection] whose tensors have the documented site shapes
      and ``c``'s dtype; the block maps (B, N, D) to (B, N, D), finite, in the input's dtype
      (float32 and float64).
    * **batch independence**: changing sample j's tokens and conditioning changes no other
      sample's output (float64, parameters moved off their init).
    * **conditioning reaches the output**: changing a sample's ``c`` changes its output.
    * **no dead parameters**: training a freshly built block with plain SGD on a regression
      loss gives every mechanism parameter a non-zero gradient within
      `DEAD_PARAMETER_STEPS` steps (a zero-initialised gate delays what it gates by one
      step; two zero-initialised layers in a row never move), except those named in the
      class's ``unused_parameters`` (which must then get none). The shared module's
      parameters count as the mechanism's, named ``shared.<name>``.
    * **state_dict round trip**: a second block that loads the first one's ``state_dict`` computes
      the same output (no state outside the state dict).
    * **torch.compile**: the block compiles (``fullgraph=True`` unless the class sets
      ``compile_fullgraph = False``) with windows and a relative bias, and matches eager.
      ``torch._dynamo.reset()`` is called around the compilation.
    * **identity at initialisation**: only for classes that set ``identity_at_init = True``: a
      freshly built block returns its input exactly.

    Args:
        mechanism: a [`ConditioningMechanism`][diffit_toolkit.nn.block.ConditioningMechanism] subclass or a
            registered name.
        options: keyword options of the mechanism (a recipe's ``mechanism_options``).
        max_examples: hypothesis examples per property.
        compile_backend: ``torch.compile`` backend (``eager`` checks graph capture only, fast).

    Returns:
        A [`ConformanceReport`][diffit_toolkit.testing.ConformanceReport] of the properties checked.

    Raises:
        ConformanceError: one line naming the mechanism, the property and the failing case.
    """
    name, cls = resolve_mechanism(mechanism)
    subject = f"conditioning mechanism '{name}'"
    harness = _MechanismHarness(cls, dict(options or {}))
    cases = _block_cases(cls)
    passed: list[str] = []

    def shapes_and_dtypes(case: _BlockCase) -> None:
        for dtype in (torch.float32, torch.float64):
            block = harness.perturbed_block(case, dtype)
            x, c = harness.inputs(case, dtype)
            inj = block.injection(c)
            _require(isinstance(inj, Injection), f"forward(c) returned {type(inj).__name__}, not an Injection")
            for site in (f.name for f in dataclasses.fields(Injection)):
                value = getattr(inj, site)
                if value is None:
                    continue
                _require(site in SITE_SHAPES, f"injection site '{site}' has no shape rule in diffit_toolkit.testing.SITE_SHAPES")
                _require(isinstance(value, Tensor), f"injection site '{site}' holds a {type(value).__name__}")
                _require(
                    _site_shape_ok(site, tuple(value.shape), block.spec, case.batch),
                    f"injection site '{site}' has shape {tuple(value.shape)}, expected {SITE_SHAPES[site]}",
                )
                _require(value.dtype == dtype, f"injection site '{site}' is {value.dtype} for {dtype} input")
            out = block(x, c)
            _require(out.shape == x.shape, f"block output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
            _require(out.dtype == dtype, f"block output is {out.dtype} for {dtype} input")
            _require(bool(torch.isfinite(out).all()), "block output is not finite")

    def batch_independence(case: _BlockCase) -> None:
        block = harness.perturbed_block(case, torch.float64)
        x, c = harness.inputs(case, torch.float64)
        with torch.no_grad():
            out = block(x, c)
            for j in range(case.batch):
                x2, c2 = x.clone(), c.clone()
                x2[j] += 1.0 + torch.randn_like(x2[j])
                c2[j] += 1.0 + torch.randn_like(c2[j])
                out2 = block(x2, c2)
                for i in range(case.batch):
                    if i == j:
                        continue
                    diff = _max_diff(out2[i], out[i])
                    _require(
                        diff <= _BLOCK_TOL * (1 + out[i].abs().max().item()),
                        f"output of sample {i} changed by {diff:.1e} when only sample {j} changed",
                    )

    def conditioning_reaches_output(case: _BlockCase) -> None:
        block = harness.perturbed_block(case, torch.float64)
        x, c = harness.inputs(case, torch.float64)
        with torch.no_grad():
            out, other = block(x, c), block(x, c + 1.0 + torch.randn_like(c))
        for i in range(case.batch):
            _require(_max_diff(other[i], out[i]) > 1e-6, f"changing sample {i}'s conditioning leaves its output unchanged")

    def no_dead_parameters(case: _BlockCase) -> None:
        block = harness.block(case, torch.float64).train()  # as freshly built
        params = {n: p for n, p in block.mechanism_parameters().items() if p.requires_grad}
        unknown = sorted(set(cls.unused_parameters) - set(block.mechanism_parameters()))
        _require(not unknown, f"unused_parameters names {unknown}, which the mechanism does not have")
        x, c = harness.inputs(case, torch.float64)
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(case.seed + 3), dtype=torch.float64)
        # A zero-initialised gate delays the gradient of what it gates by one step (adaLN-Zero's
        # design); a parameter with no gradient after DEAD_PARAMETER_STEPS steps never gets one.
        optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
        reached: set[str] = set()
        for _ in range(DEAD_PARAMETER_STEPS):
            optimizer.zero_grad()
            (block(x, c) - target).square().mean().backward()
            reached |= {n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
            if reached >= set(params) - cls.unused_parameters:
                break
            optimizer.step()
        for pname in params:
            if pname in cls.unused_parameters:
                _require(pname not in reached, f"parameter '{pname}' is declared unused but receives a gradient")
            else:
                _require(
                    pname in reached,
                    f"parameter '{pname}' receives no gradient in {DEAD_PARAMETER_STEPS} SGD steps from init "
                    f"(declare it in unused_parameters if intended)",
                )

    def state_dict_round_trip(case: _BlockCase) -> None:
        first = harness.perturbed_block(case, torch.float64)
        second = harness.block(case, torch.float64, seed=case.seed + 7)
        second.load_state_dict(first.state_dict())
        x, c = harness.inputs(case, torch.float64)
        with torch.no_grad():
            a, again, b = first(x, c), first(x, c), second(x, c)
        _require(torch.equal(a, again), "two calls on the same input differ (the forward pass is not deterministic)")
        diff = _max_diff(a, b)
        _require(
            diff <= _BLOCK_TOL * (1 + a.abs().max().item()),
            f"a block loaded from another's state_dict differs by {diff:.1e} (state outside the state_dict?)",
        )

    for prop, test in (
        ("output shapes and dtypes", shapes_and_dtypes),
        ("batch independence", batch_independence),
        ("conditioning reaches the output", conditioning_reaches_output),
        ("no dead parameters", no_dead_parameters),
        ("state_dict round trip", state_dict_round_trip),
    ):
        _check_property(subject, prop, cases, test, max_examples)
        passed.append(prop)

    _check_compile(subject, harness, compile_backend)
    passed.append("torch.compile")

    if cls.identity_at_init:

        def identity_at_init(case: _BlockCase) -> None:
            for dtype in (torch.float32, torch.float64):
                block = harness.block(case, dtype)
                x, c = harness.inputs(case, dtype)
                with torch.no_grad():
                    out = block(x, c)
                _require(
                    torch.equal(out, x),
                    f"declares identity_at_init but a fresh block changes its input by {_max_diff(out, x):.1e} ({dtype})",
                )

        _check_property(subject, "identity at initialisation", cases, identity_at_init, max_examples)
        passed.append("identity at initialisation")
    return ConformanceReport(subject, tuple(passed))


def _check_compile(subject: str, harness: _MechanismHarness, backend: str) -> None:
    """Compile one block on the path that exercises the most of the block (windows and a relative
    bias) and compare to eager. One compilation only: it is the slow part of the kit."""
    fullgraph = harness.cls.compile_fullgraph
    prop = "torch.compile" + (" (fullgraph)" if fullgraph else "")
    spec = BlockSpec(dim=16, num_heads=2, cond_dim=8, grid=(4, 4), window=2, rel_pos_bias=True, attention_backend="math")
    case = _BlockCase(spec, batch=2, seed=0)
    try:
        block = harness.perturbed_block(case, torch.float32)
        x, c = harness.inputs(case, torch.float32)
        torch._dynamo.reset()  # fresh caches: every block shares DiffiTBlock.forward's code object
        compiled = torch.compile(block, backend=backend, fullgraph=fullgraph)
        with torch.no_grad():
            got, expected = compiled(x, c), block(x, c)
    except Exception as exc:
        raise ConformanceError(f"{subject}: {prop} failed: raised {_one_line(exc)} [{case}]") from exc
    finally:
        torch._dynamo.reset()
    diff = _max_diff(got, expected)
    if diff > 1e-5 * (1 + expected.abs().max().item()):
        raise ConformanceError(f"{subject}: {prop} failed: compiled output differs from eager by {diff:.1e} [{case}]")


# --------------------------------------------------------------------------------------------
# Attention backends
# --------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HEAD_DIMS = (4, 8, 72)  # 72: the head dim of DiT/DiffiT-XL, not a power of two
_BIAS_LAYOUTS = ("none", "shared", "per-sample", "expanded")


@dataclass(frozen=True)
class _KernelCase:
    batch: int
    heads: int
    queries: int
    extra_keys: int
    head_dim: int
    dtype: torch.dtype
    bias: str
    seed: int

    def __str__(self) -> str:
        return (
            f"batch={self.batch} heads={self.heads} queries={self.queries} keys={self.queries + self.extra_keys} "
            f"head_dim={self.head_dim} dtype={str(self.dtype).removeprefix('torch.')} bias={self.bias} seed={self.seed}"
        )


@dataclass(frozen=True)
class _ModuleCase:
    heads: int
    head_dim: int
    grid: tuple[int, int]
    window: int | None
    rel_pos_bias: bool
    table_offset: bool
    extra_tokens: bool
    dtype: torch.dtype
    batch: int
    seed: int

    def __str__(self) -> str:
        return (
            f"heads={self.heads} head_dim={self.head_dim} grid={self.grid[0]}x{self.grid[1]} window={self.window} "
            f"bias={self.rel_pos_bias} table_offset={self.table_offset} extra_tokens={self.extra_tokens} "
            f"dtype={str(self.dtype).removeprefix('torch.')} batch={self.batch} seed={self.seed}"
        )


def _resolve_backend(backend: str | AttentionBackend) -> AttentionBackend:
    if isinstance(backend, AttentionBackend):
        return backend
    if isinstance(backend, str):
        return attention_backends.get(backend)
    raise TypeError(f"expected a registered attention backend name or an AttentionBackend, got {backend!r}")


def _default_device(backend: AttentionBackend) -> str:
    if torch.cuda.is_available() and "cuda" in backend.devices:
        return "cuda"
    return "cpu"


def _kernel_inputs(case: _KernelCase, device: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """q (B, H, N, d), k/v (B, H, M, d) in float32 and a float32 bias of the case's layout."""
    g = torch.Generator().manual_seed(case.seed)
    B, H, N, M, d = case.batch, case.heads, case.queries, case.queries + case.extra_keys, case.head_dim
    q = torch.randn(B, H, N, d, generator=g)
    k, v = torch.randn(B, H, M, d, generator=g), torch.randn(B, H, M, d, generator=g)
    bias = None
    if case.bias == "shared":
        bias = torch.randn(1, H, N, M, generator=g)
    elif case.bias == "per-sample":
        bias = torch.randn(B, H, N, M, generator=g)
    elif case.bias == "expanded":  # stride-0 batch dim, as the attention module passes it
        bias = torch.randn(1, H, N, M, generator=g).expand(B, H, N, M)
    return tuple(None if t is None else t.to(device) for t in (q, k, v, bias))  # type: ignore[return-value]


def _reference(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """``attention_math`` in float64."""
    scale = q.shape[-1] ** -0.5
    return attention_math(q.double(), k.double(), v.double(), None if bias is None else bias.double(), scale)


def check_attention_backend(
    backend: str | AttentionBackend,
    *,
    device: str | None = None,
    max_examples: int = DEFAULT_EXAMPLES,
) -> ConformanceReport:
    """Check an attention backend against the ``math`` reference; raise on the first failure.

    Every case draws only what the backend declares it takes (its ``dtypes``, ``supports_bias``,
    ``max_head_dim``); the reference is ``attention_math`` in float64, and the tolerance is
    [`TOLERANCE`][diffit_toolkit.testing.TOLERANCE] of the input dtype. Properties (see
    [`ATTENTION_PROPERTIES`][diffit_toolkit.testing.ATTENTION_PROPERTIES]):

    * **kernel equals math**: ``fn(q, k, v, bias, scale)`` has q's shape and dtype and matches the
      reference, with more keys than queries (extra tokens), and a bias that is absent, shared by
      the batch ``(1, H, N, M)``, per sample ``(B, H, N, M)`` or a stride-0 expansion of a shared one.
    * **module equals math**: an [`Attention`][diffit_toolkit.nn.attention.Attention] module running the
      backend matches one running ``math`` with the same weights, over windows, a relative
      position bias with a per-sample table offset, and extra tokens (the calls blocks make).
    * **batch independence**: changing sample j's q, k, v (and its bias) changes no other sample.
    * **gradients equal math**: q, k, v and bias gradients in float32, where the backend declares a
      backward pass on the device (else skipped, with the reason in the report).

    Args:
        backend: an [`AttentionBackend`][diffit_toolkit.nn.attention.AttentionBackend] or a registered name.
        device: device type to check on (default: ``cuda`` when available and supported, else ``cpu``).
        max_examples: hypothesis examples per property.

    Returns:
        A [`ConformanceReport`][diffit_toolkit.testing.ConformanceReport]; ``skipped`` names
        properties that cannot run here.

    Raises:
        unittest.SkipTest: the backend is unavailable in this process or does not run on the
            device (pytest reports the test as skipped, with the reason).
        ConformanceError: one line naming the backend, the property and the failing case.
    """
    spec = _resolve_backend(backend)
    subject = f"attention backend '{spec.name}'"
    reason = spec.unavailable_reason()
    if reason is not None:
        raise unittest.SkipTest(f"{subject} is unavailable here: {reason}")
    device = device or _default_device(spec)
    if device not in spec.devices:
        raise unittest.SkipTest(f"{subject} runs on {', '.join(sorted(spec.devices))}, not on {device}")
    dtypes = [d for d in _DTYPES if d in spec.dtypes]
    head_dims = [d for d in _HEAD_DIMS if spec.max_head_dim is None or d <= spec.max_head_dim]
    if not dtypes or not head_dims:
        raise unittest.SkipTest(f"{subject} declares no dtype or head dim the kit can test")
    bias_layouts = _BIAS_LAYOUTS if spec.supports_bias else ("none",)
    passed: list[str] = []
    skipped: dict[str, str] = {}

    def kernel_cases(dtype_choices: list[torch.dtype]) -> st.SearchStrategy[_KernelCase]:
        return st.builds(
            _KernelCase,
            batch=st.integers(1, 3),
            heads=st.integers(1, 3),
            queries=st.integers(1, 20),
            extra_keys=st.integers(0, 2),
            head_dim=st.sampled_from(head_dims),
            dtype=st.sampled_from(dtype_choices),
            bias=st.sampled_from(bias_layouts),
            seed=st.integers(0, 2**16),
        )

    def run_kernel(case: _KernelCase, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        scale = case.head_dim**-0.5
        return spec.fn(q.to(case.dtype), k.to(case.dtype), v.to(case.dtype), bias, scale)

    def close(out: Tensor, ref: Tensor, dtype: torch.dtype) -> tuple[bool, float, float]:
        tol = TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
        diff = _max_diff(out, ref)
        return diff <= tol, diff, tol

    def kernel_equals_math(case: _KernelCase) -> None:
        q, k, v, bias = _kernel_inputs(case, device)
        with torch.no_grad():
            out = run_kernel(case, q, k, v, bias)
        _require(tuple(out.shape) == tuple(q.shape), f"output shape {tuple(out.shape)}, expected {tuple(q.shape)}")
        _require(out.dtype == case.dtype, f"output dtype {out.dtype} for {case.dtype} inputs")
        ok, diff, tol = close(out, _reference(q.to(case.dtype), k.to(case.dtype), v.to(case.dtype), bias), case.dtype)
        _require(ok, f"differs from the math reference by {diff:.1e} (tolerance {tol:.1e})")

    def batch_independence(case: _KernelCase) -> None:
        if case.batch < 2:
            return
        q, k, v, bias = _kernel_inputs(case, device)
        with torch.no_grad():
            out = run_kernel(case, q, k, v, bias)
            j = case.seed % case.batch
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            for t in (q2, k2, v2):
                t[j] += 10.0 + torch.randn_like(t[j])
            bias2 = bias
            if bias is not None and case.bias == "per-sample":
                bias2 = bias.clone()
                bias2[j] += 1.0
            out2 = run_kernel(case, q2, k2, v2, bias2)
        keep = [i for i in range(case.batch) if i != j]
        # Samples are independent computations: only rounding may differ, far below TOLERANCE.
        tol = 4 * torch.finfo(case.dtype).eps * max(1.0, out[keep].abs().max().item())
        diff = _max_diff(out2[keep], out[keep])
        _require(diff <= tol, f"other samples changed by {diff:.1e} (tolerance {tol:.1e}) when only sample {j} changed")

    def module_cases() -> st.SearchStrategy[_ModuleCase]:
        @st.composite
        def draw_case(draw: st.DrawFn) -> _ModuleCase:
            window = draw(st.sampled_from([None, 1, 2]))
            base = window or draw(st.integers(2, 3))
            grid = (base * draw(st.integers(1, 2)), base * draw(st.integers(1, 2)))
            bias = spec.supports_bias and draw(st.booleans())
            return _ModuleCase(
                heads=draw(st.integers(1, 2)),
                head_dim=draw(st.sampled_from(head_dims)),
                grid=grid,
                window=window,
                rel_pos_bias=bias,
                table_offset=bias and draw(st.booleans()),
                extra_tokens=draw(st.booleans()),
                dtype=draw(st.sampled_from(dtypes)),
                batch=draw(st.integers(1, 2)),
                seed=draw(st.integers(0, 2**16)),
            )

        return draw_case()

    def module_equals_math(case: _ModuleCase) -> None:
        dim = case.heads * case.head_dim
        kwargs = dict(grid=case.grid, window=case.window, rel_pos_bias=case.rel_pos_bias)
        with _seeded(case.seed):
            ref = Attention(dim, case.heads, backend="math", **kwargs).to(device)
            with torch.no_grad():  # a visible bias, not trunc-normal(0.02)
                if case.rel_pos_bias:
                    ref.relative_position_bias_table.normal_()
        fast = Attention(dim, case.heads, backend="math", **kwargs).to(device)
        fast.load_state_dict(ref.state_dict())
        fast = fast.to(case.dtype)
        fast.backend = BackendChoice(spec.name, spec, ())  # this backend, no fallback
        g = torch.Generator().manual_seed(case.seed + 1)
        x = torch.randn(case.batch, case.grid[0] * case.grid[1], dim, generator=g).to(device)
        extra = torch.randn(case.batch, 1, dim, generator=g).to(device) if case.extra_tokens else None
        offset = None
        if case.table_offset:
            offset = torch.randn(case.batch, ref.bias_table_size, case.heads, generator=g).to(device)
        has_bias = case.rel_pos_bias
        if not spec.supports(device, case.dtype, has_bias, case.head_dim):
            return  # a call this backend does not declare: nothing to compare
        with torch.no_grad():
            expected = ref.double()(x.double(), bias_table_offset=None if offset is None else offset.double(),
                                    extra_tokens=None if extra is None else extra.double())
            out = fast(x.to(case.dtype), bias_table_offset=offset,
                       extra_tokens=None if extra is None else extra.to(case.dtype))
        _require(out.dtype == case.dtype, f"module output dtype {out.dtype} for {case.dtype} input")
        ok, diff, tol = close(out, expected, case.dtype)
        _require(ok, f"differs from the math module by {diff:.1e} (tolerance {tol:.1e})")

    def gradients_equal_math(case: _KernelCase) -> None:
        q, k, v, bias = _kernel_inputs(case, device)
        leaf_bias = None if bias is None else bias[:1].clone() if case.bias == "expanded" else bias.clone()

        def grads(fn: Callable[..., Tensor], dtype: torch.dtype) -> list[Tensor | None]:
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            b = None
            if leaf_bias is not None:
                b = leaf_bias.detach().to(dtype).requires_grad_()
                leaves.append(b)
                b = b.expand(bias.shape)
            out = fn(*leaves[:3], b, case.head_dim**-0.5)
            out.float().square().sum().backward()
            return [t.grad for t in leaves]

        expected = grads(attention_math, torch.float64)
        got = grads(spec.fn, torch.float32)
        for label, g_got, g_exp in zip(("q", "k", "v", "bias"), got, expected):
            _require(g_got is not None, f"no gradient reaches {label}")
            tol = 1e-4 * max(1.0, g_exp.abs().max().item())
            diff = _max_diff(g_got, g_exp)
            _require(diff <= tol, f"{label} gradient differs from math by {diff:.1e} (tolerance {tol:.1e})")

    _check_property(subject, "kernel equals math", kernel_cases(dtypes), kernel_equals_math, max_examples)
    passed.append("kernel equals math")
    _check_property(subject, "module equals math", module_cases(), module_equals_math, max_examples)
    passed.append("module equals math")
    _check_property(subject, "batch independence", kernel_cases(dtypes), batch_independence, max_examples)
    passed.append("batch independence")

    grad_head_dims = [d for d in head_dims if spec.supports(device, torch.float32, False, d, needs_grad=True)]
    if torch.float32 not in spec.dtypes:
        skipped["gradients equal math"] = "the backend takes no float32 inputs"
    elif not grad_head_dims:
        skipped["gradients equal math"] = f"no backward pass on {device} (declared backward_devices)"
    else:
        _check_property(
            subject, "gradients equal math", kernel_cases([torch.float32]), gradients_equal_math, max_examples
        )
        passed.append("gradients equal math")
    return ConformanceReport(subject, tuple(passed), skipped)


# --------------------------------------------------------------------------------------------
# pytest plugin
# --------------------------------------------------------------------------------------------


def pytest_generate_tests(metafunc: Any) -> None:
    """Parametrise test arguments named ``conditioning_name`` / ``attention_backend_name`` over
    every registered conditioning mechanism / attention backend."""
    if "conditioning_name" in metafunc.fixturenames:
        metafunc.parametrize("conditioning_name", conditioning.names())
    if "attention_backend_name" in metafunc.fixturenames:
        metafunc.parametrize("attention_backend_name", attention_backends.names())

