"""The conformance kit for conditioning mechanisms: each property one function of a
[`MechanismTarget`][diffit_toolkit.testing.mechanisms.MechanismTarget], checked on
[`DiffiTBlock`][diffit_toolkit.nn.block.DiffiTBlock] s of toy shapes drawn by hypothesis."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffit_toolkit.errors import one_line
from diffit_toolkit.nn.block import (
    SITE_SHAPES,
    BlockSpec,
    Conditioning,
    ConditioningMechanism,
    DiffiTBlock,
    Injection,
    resolve_mechanism,
)
from diffit_toolkit.testing.core import (
    DEFAULT_EXAMPLES,
    ConformanceError,
    ConformanceReport,
    Property,
    PropertyCheck,
    bind,
    check_examples,
    expect,
    max_diff,
    perturb_,
    run_checks,
    seeded,
    st,
)
__all__ = [
    "DEAD_PARAMETER_STEPS",
    "MECHANISM_PROPERTIES",
    "MechanismTarget",
    "check_mechanism",
    "mechanism_checks",
]

#: SGD steps from a fresh block within which every parameter must receive a gradient.
DEAD_PARAMETER_STEPS = 3

#: Tolerance of the float64 block checks (batch independence, round trip): round-off only.
_BLOCK_TOL = 1e-9


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


@dataclass(frozen=True)
class MechanismTarget:
    """A mechanism as the kit checks it.

    Attributes:
        name: registered name (or the class's ``name`` / ``__name__``).
        cls: the mechanism class.
        options: its keyword options (a recipe's ``mechanism_options``).
        max_examples: hypothesis examples per property.
        compile_backend: ``torch.compile`` backend of the compile check.
    """

    name: str
    cls: type[ConditioningMechanism]
    options: dict[str, Any] = field(default_factory=dict)
    max_examples: int = DEFAULT_EXAMPLES
    compile_backend: str = "eager"

    @property
    def subject(self) -> str:
        return f"conditioning mechanism '{self.name}'"

    def block(self, case: _BlockCase, dtype: torch.dtype, seed: int | None = None) -> _Unit:
        with seeded(case.seed if seed is None else seed):
            block = DiffiTBlock(case.spec, self.cls, dict(self.options))
            shared = self.cls.shared_module(block.spec, **self.options)
        return _Unit(block, shared).to(dtype).eval()

    def perturbed_block(self, case: _BlockCase, dtype: torch.dtype) -> _Unit:
        """A block whose parameters are moved off their init (zero inits would hide bugs)."""
        block = self.block(case, dtype)
        perturb_(block, case.seed + 1)
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


# -- the properties, one function each ------------------------------------------------------------


def _shapes_and_dtypes(t: MechanismTarget, case: _BlockCase) -> None:
    for dtype in (torch.float32, torch.float64):
        block = t.perturbed_block(case, dtype)
        x, c = t.inputs(case, dtype)
        inj = block.injection(c)
        expect(isinstance(inj, Injection), f"forward(c) returned {type(inj).__name__}, not an Injection")
        for site in (f.name for f in dataclasses.fields(Injection)):
            value = getattr(inj, site)
            if value is None:
                continue
            expect(site in SITE_SHAPES, f"injection site '{site}' has no shape rule in diffit_toolkit.testing.SITE_SHAPES")
            expect(isinstance(value, Tensor), f"injection site '{site}' holds a {type(value).__name__}")
            expect(
                _site_shape_ok(site, tuple(value.shape), block.spec, case.batch),
                f"injection site '{site}' has shape {tuple(value.shape)}, expected {SITE_SHAPES[site]}",
            )
            expect(value.dtype == dtype, f"injection site '{site}' is {value.dtype} for {dtype} input")
        out = block(x, c)
        expect(out.shape == x.shape, f"block output has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        expect(out.dtype == dtype, f"block output is {out.dtype} for {dtype} input")
        expect(bool(torch.isfinite(out).all()), "block output is not finite")


def _batch_independence(t: MechanismTarget, case: _BlockCase) -> None:
    block = t.perturbed_block(case, torch.float64)
    x, c = t.inputs(case, torch.float64)
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
                diff = max_diff(out2[i], out[i])
                expect(
                    diff <= _BLOCK_TOL * (1 + out[i].abs().max().item()),
                    f"output of sample {i} changed by {diff:.1e} when only sample {j} changed",
                )


def _conditioning_reaches_output(t: MechanismTarget, case: _BlockCase) -> None:
    block = t.perturbed_block(case, torch.float64)
    x, c = t.inputs(case, torch.float64)
    with torch.no_grad():
        out, other = block(x, c), block(x, c + 1.0 + torch.randn_like(c))
    for i in range(case.batch):
        expect(max_diff(other[i], out[i]) > 1e-6, f"changing sample {i}'s conditioning leaves its output unchanged")


def _no_dead_parameters(t: MechanismTarget, case: _BlockCase) -> None:
    unused = t.cls.unused_parameters
    block = t.block(case, torch.float64).train()  # as freshly built
    params = {n: p for n, p in block.mechanism_parameters().items() if p.requires_grad}
    unknown = sorted(set(unused) - set(block.mechanism_parameters()))
    expect(not unknown, f"unused_parameters names {unknown}, which the mechanism does not have")
    x, c = t.inputs(case, torch.float64)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(case.seed + 3), dtype=torch.float64)
    # A zero-initialised gate delays the gradient of what it gates by one step (adaLN-Zero's
    # design); a parameter with no gradient after DEAD_PARAMETER_STEPS steps never gets one.
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    reached: set[str] = set()
    for _ in range(DEAD_PARAMETER_STEPS):
        optimizer.zero_grad()
        (block(x, c) - target).square().mean().backward()
        reached |= {n for n, p in params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        if reached >= set(params) - unused:
            break
        optimizer.step()
    for pname in params:
        if pname in unused:
            expect(pname not in reached, f"parameter '{pname}' is declared unused but receives a gradient")
        else:
            expect(
                pname in reached,
                f"parameter '{pname}' receives no gradient in {DEAD_PARAMETER_STEPS} SGD steps from init "
                f"(declare it in unused_parameters if intended)",
            )


def _state_dict_round_trip(t: MechanismTarget, case: _BlockCase) -> None:
    first = t.perturbed_block(case, torch.float64)
    second = t.block(case, torch.float64, seed=case.seed + 7)
    second.load_state_dict(first.state_dict())
    x, c = t.inputs(case, torch.float64)
    with torch.no_grad():
        a, again, b = first(x, c), first(x, c), second(x, c)
    expect(torch.equal(a, again), "two calls on the same input differ (the forward pass is not deterministic)")
    diff = max_diff(a, b)
    expect(
        diff <= _BLOCK_TOL * (1 + a.abs().max().item()),
        f"a block loaded from another's state_dict differs by {diff:.1e} (state outside the state_dict?)",
    )


def _identity_at_init(t: MechanismTarget, case: _BlockCase) -> None:
    for dtype in (torch.float32, torch.float64):
        block = t.block(case, dtype)
        x, c = t.inputs(case, dtype)
        with torch.no_grad():
            out = block(x, c)
        expect(
            torch.equal(out, x),
            f"declares identity_at_init but a fresh block changes its input by {max_diff(out, x):.1e} ({dtype})",
        )


def _torch_compile(t: MechanismTarget) -> None:
    """Compile one block on the path that exercises the most of the block (windows and a relative
    bias) and compare to eager. One compilation only: it is the slow part of the kit."""
    fullgraph = t.cls.compile_fullgraph
    prop = "torch.compile" + (" (fullgraph)" if fullgraph else "")
    spec = BlockSpec(dim=16, num_heads=2, cond_dim=8, grid=(4, 4), window=2, rel_pos_bias=True, attention_backend="math")
    case = _BlockCase(spec, batch=2, seed=0)
    try:
        block = t.perturbed_block(case, torch.float32)
        x, c = t.inputs(case, torch.float32)
        torch._dynamo.reset()  # fresh caches: every block shares DiffiTBlock.forward's code object
        compiled = torch.compile(block, backend=t.compile_backend, fullgraph=fullgraph)
        with torch.no_grad():
            got, expected = compiled(x, c), block(x, c)
    except Exception as exc:
        raise ConformanceError(f"{t.subject}: {prop} failed: raised {one_line(exc)} [{case}]") from exc
    finally:
        torch._dynamo.reset()
    diff = max_diff(got, expected)
    if diff > 1e-5 * (1 + expected.abs().max().item()):
        raise ConformanceError(f"{t.subject}: {prop} failed: compiled output differs from eager by {diff:.1e} [{case}]")


def _on_blocks(name: str, test: Callable[[MechanismTarget, _BlockCase], None],
               applies: Callable[[MechanismTarget], bool] | None = None) -> Property[MechanismTarget]:
    """A property checked on hypothesis examples of toy blocks."""

    def check(t: MechanismTarget) -> None:
        check_examples(t.subject, name, _block_cases(t.cls), lambda case: test(t, case), t.max_examples)

    return Property(name, check, applies or (lambda t: True))


#: The properties of a conditioning mechanism, by name, in the order
#: [`check_mechanism`][diffit_toolkit.testing.mechanisms.check_mechanism] checks them (the last
#: only for classes that declare ``identity_at_init``).
MECHANISM_PROPERTIES: dict[str, Property[MechanismTarget]] = {
    p.name: p
    for p in (
        _on_blocks("output shapes and dtypes", _shapes_and_dtypes),
        _on_blocks("batch independence", _batch_independence),
        _on_blocks("conditioning reaches the output", _conditioning_reaches_output),
        _on_blocks("no dead parameters", _no_dead_parameters),
        _on_blocks("state_dict round trip", _state_dict_round_trip),
        Property("torch.compile", _torch_compile),
        _on_blocks("identity at initialisation", _identity_at_init, applies=lambda t: bool(t.cls.identity_at_init)),
    )
}


def mechanism_target(
    mechanism: str | type[ConditioningMechanism],
    *,
    options: dict[str, Any] | None = None,
    max_examples: int = DEFAULT_EXAMPLES,
    compile_backend: str = "eager",
) -> MechanismTarget:
    """The [`MechanismTarget`][diffit_toolkit.testing.mechanisms.MechanismTarget] of a class or a
    registered name."""
    name, cls = resolve_mechanism(mechanism)
    return MechanismTarget(name, cls, dict(options or {}), max_examples, compile_backend)


def mechanism_checks(
    mechanism: str | type[ConditioningMechanism],
    *,
    options: dict[str, Any] | None = None,
    max_examples: int = DEFAULT_EXAMPLES,
    compile_backend: str = "eager",
) -> list[PropertyCheck]:
    """One check per property of a mechanism, for ``@pytest.mark.parametrize`` (one test each):

    ```python
    @pytest.mark.parametrize("check", mechanism_checks(GatedTMSA), ids=str)
    def test_gated_tmsa(check):
        check()
    ```

    Arguments as [`check_mechanism`][diffit_toolkit.testing.mechanisms.check_mechanism].
    """
    target = mechanism_target(mechanism, options=options, max_examples=max_examples, compile_backend=compile_backend)
    return bind(target.name, target, MECHANISM_PROPERTIES.values())


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
    one, with tokens appended to the sequence dropped from the output. Properties, in order (see
    [`MECHANISM_PROPERTIES`][diffit_toolkit.testing.mechanisms.MECHANISM_PROPERTIES]):

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
        A [`ConformanceReport`][diffit_toolkit.testing.core.ConformanceReport] of the properties checked.

    Raises:
        ConformanceError: one line naming the mechanism, the property and the failing case.
    """
    target = mechanism_target(mechanism, options=options, max_examples=max_examples, compile_backend=compile_backend)
    return run_checks(target.subject, bind(target.name, target, MECHANISM_PROPERTIES.values()))
