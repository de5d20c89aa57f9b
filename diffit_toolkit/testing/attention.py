"""The conformance kit for attention backends: each property one function of an
[`AttentionTarget`][diffit_toolkit.testing.attention.AttentionTarget], checked against the
float64 ``math`` reference on cases hypothesis draws from what the backend declares."""

from __future__ import annotations

import unittest
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffit_toolkit.nn.attention import Attention, AttentionBackend, BackendChoice, attention_math
from diffit_toolkit.registry import attention_backends
from diffit_toolkit.testing.core import (
    DEFAULT_EXAMPLES,
    ConformanceReport,
    Property,
    PropertyCheck,
    bind,
    check_examples,
    expect,
    max_diff,
    run_checks,
    seeded,
    st,
)

__all__ = [
    "ATTENTION_PROPERTIES",
    "TOLERANCE",
    "AttentionTarget",
    "attention_backend_checks",
    "check_attention_backend",
]

#: Absolute tolerance against the float64 reference, per input dtype (scaled by max(1, |ref|)).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

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


@dataclass(frozen=True)
class AttentionTarget:
    """An attention backend as the kit checks it.

    Attributes:
        spec: the backend.
        device: device type to check on (``None``: ``cuda`` when available and supported, else ``cpu``).
        max_examples: hypothesis examples per property.
    """

    spec: AttentionBackend
    device: str | None = None
    max_examples: int = DEFAULT_EXAMPLES

    @property
    def subject(self) -> str:
        return f"attention backend '{self.spec.name}'"

    @property
    def on(self) -> str:
        """The device type the checks run on."""
        if self.device is not None:
            return self.device
        return "cuda" if torch.cuda.is_available() and "cuda" in self.spec.devices else "cpu"

    @property
    def dtypes(self) -> list[torch.dtype]:
        return [d for d in _DTYPES if d in self.spec.dtypes]

    @property
    def head_dims(self) -> list[int]:
        return [d for d in _HEAD_DIMS if self.spec.max_head_dim is None or d <= self.spec.max_head_dim]

    @property
    def bias_layouts(self) -> tuple[str, ...]:
        return _BIAS_LAYOUTS if self.spec.supports_bias else ("none",)

    def require_available(self) -> None:
        """Raise ``unittest.SkipTest`` (with the reason) when the backend cannot be checked here."""
        reason = self.spec.unavailable_reason()
        if reason is not None:
            raise unittest.SkipTest(f"{self.subject} is unavailable here: {reason}")
        if self.on not in self.spec.devices:
            raise unittest.SkipTest(f"{self.subject} runs on {', '.join(sorted(self.spec.devices))}, not on {self.on}")
        if not self.dtypes or not self.head_dims:
            raise unittest.SkipTest(f"{self.subject} declares no dtype or head dim the kit can test")

    def kernel_cases(self, dtypes: list[torch.dtype]) -> st.SearchStrategy[_KernelCase]:
        return st.builds(
            _KernelCase,
            batch=st.integers(1, 3),
            heads=st.integers(1, 3),
            queries=st.integers(1, 20),
            extra_keys=st.integers(0, 2),
            head_dim=st.sampled_from(self.head_dims),
            dtype=st.sampled_from(dtypes),
            bias=st.sampled_from(self.bias_layouts),
            seed=st.integers(0, 2**16),
        )

    def module_cases(self) -> st.SearchStrategy[_ModuleCase]:
        @st.composite
        def draw_case(draw: st.DrawFn) -> _ModuleCase:
            window = draw(st.sampled_from([None, 1, 2]))
            base = window or draw(st.integers(2, 3))
            grid = (base * draw(st.integers(1, 2)), base * draw(st.integers(1, 2)))
            bias = self.spec.supports_bias and draw(st.booleans())
            return _ModuleCase(
                heads=draw(st.integers(1, 2)),
                head_dim=draw(st.sampled_from(self.head_dims)),
                grid=grid,
                window=window,
                rel_pos_bias=bias,
                table_offset=bias and draw(st.booleans()),
                extra_tokens=draw(st.booleans()),
                dtype=draw(st.sampled_from(self.dtypes)),
                batch=draw(st.integers(1, 2)),
                seed=draw(st.integers(0, 2**16)),
            )

        return draw_case()

    def run_kernel(self, case: _KernelCase, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        scale = case.head_dim**-0.5
        return self.spec.fn(q.to(case.dtype), k.to(case.dtype), v.to(case.dtype), bias, scale)


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


def _close(out: Tensor, ref: Tensor, dtype: torch.dtype) -> tuple[bool, float, float]:
    tol = TOLERANCE[dtype] * max(1.0, ref.abs().max().item())
    diff = max_diff(out, ref)
    return diff <= tol, diff, tol


# -- the properties, one function each ------------------------------------------------------------


def _kernel_equals_math(t: AttentionTarget, case: _KernelCase) -> None:
    q, k, v, bias = _kernel_inputs(case, t.on)
    with torch.no_grad():
        out = t.run_kernel(case, q, k, v, bias)
    expect(tuple(out.shape) == tuple(q.shape), f"output shape {tuple(out.shape)}, expected {tuple(q.shape)}")
    expect(out.dtype == case.dtype, f"output dtype {out.dtype} for {case.dtype} inputs")
    ok, diff, tol = _close(out, _reference(q.to(case.dtype), k.to(case.dtype), v.to(case.dtype), bias), case.dtype)
    expect(ok, f"differs from the math reference by {diff:.1e} (tolerance {tol:.1e})")


def _module_equals_math(t: AttentionTarget, case: _ModuleCase) -> None:
    spec, device = t.spec, t.on
    dim = case.heads * case.head_dim
    kwargs = dict(grid=case.grid, window=case.window, rel_pos_bias=case.rel_pos_bias)
    with seeded(case.seed):
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
    if not spec.supports(device, case.dtype, case.rel_pos_bias, case.head_dim):
        return  # a call this backend does not declare: nothing to compare
    with torch.no_grad():
        expected = ref.double()(x.double(), bias_table_offset=None if offset is None else offset.double(),
                                extra_tokens=None if extra is None else extra.double())
        out = fast(x.to(case.dtype), bias_table_offset=offset,
                   extra_tokens=None if extra is None else extra.to(case.dtype))
    expect(out.dtype == case.dtype, f"module output dtype {out.dtype} for {case.dtype} input")
    ok, diff, tol = _close(out, expected, case.dtype)
    expect(ok, f"differs from the math module by {diff:.1e} (tolerance {tol:.1e})")


def _batch_independence(t: AttentionTarget, case: _KernelCase) -> None:
    if case.batch < 2:
        return
    q, k, v, bias = _kernel_inputs(case, t.on)
    with torch.no_grad():
        out = t.run_kernel(case, q, k, v, bias)
        j = case.seed % case.batch
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[j] += 10.0 + torch.randn_like(x[j])
        bias2 = bias
        if bias is not None and case.bias == "per-sample":
            bias2 = bias.clone()
            bias2[j] += 1.0
        out2 = t.run_kernel(case, q2, k2, v2, bias2)
    keep = [i for i in range(case.batch) if i != j]
    # Samples are independent computations: only rounding may differ, far below TOLERANCE.
    tol = 4 * torch.finfo(case.dtype).eps * max(1.0, out[keep].abs().max().item())
    diff = max_diff(out2[keep], out[keep])
    expect(diff <= tol, f"other samples changed by {diff:.1e} (tolerance {tol:.1e}) when only sample {j} changed")


def _gradients_equal_math(t: AttentionTarget, case: _KernelCase) -> None:
    q, k, v, bias = _kernel_inputs(case, t.on)
    leaf_bias = None if bias is None else bias[:1].clone() if case.bias == "expanded" else bias.clone()

    def grads(fn: Callable[..., Tensor], dtype: torch.dtype) -> list[Tensor | None]:
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        b = None
        if leaf_bias is not None:
            b = leaf_bias.detach().to(dtype).requires_grad_()
            leaves.append(b)
            b = b.expand(bias.shape)
        out = fn(*leaves[:3], b, case.head_dim**-0.5)
        out.float().square().sum().backward()
        return [x.grad for x in leaves]

    expected = grads(attention_math, torch.float64)
    got = grads(t.spec.fn, torch.float32)
    for label, g_got, g_exp in zip(("q", "k", "v", "bias"), got, expected):
        expect(g_got is not None, f"no gradient reaches {label}")
        tol = 1e-4 * max(1.0, g_exp.abs().max().item())
        diff = max_diff(g_got, g_exp)
        expect(diff <= tol, f"{label} gradient differs from math by {diff:.1e} (tolerance {tol:.1e})")


def _kernel_property(name: str, test: Callable[[AttentionTarget, _KernelCase], None]) -> Property[AttentionTarget]:
    def check(t: AttentionTarget) -> None:
        t.require_available()
        check_examples(t.subject, name, t.kernel_cases(t.dtypes), lambda case: test(t, case), t.max_examples)

    return Property(name, check)


def _module_property(t: AttentionTarget) -> None:
    t.require_available()
    check_examples(t.subject, "module equals math", t.module_cases(), lambda case: _module_equals_math(t, case),
                   t.max_examples)


def _gradients_property(t: AttentionTarget) -> None:
    t.require_available()
    spec, device = t.spec, t.on
    grad_head_dims = [d for d in t.head_dims if spec.supports(device, torch.float32, False, d, needs_grad=True)]
    if torch.float32 not in spec.dtypes:
        raise unittest.SkipTest("the backend takes no float32 inputs")
    if not grad_head_dims:
        raise unittest.SkipTest(f"no backward pass on {device} (declared backward_devices)")
    check_examples(t.subject, "gradients equal math", t.kernel_cases([torch.float32]),
                   lambda case: _gradients_equal_math(t, case), t.max_examples)


#: The properties of an attention backend, by name, in the order
#: [`check_attention_backend`][diffit_toolkit.testing.attention.check_attention_backend] checks them.
ATTENTION_PROPERTIES: dict[str, Property[AttentionTarget]] = {
    p.name: p
    for p in (
        _kernel_property("kernel equals math", _kernel_equals_math),
        Property("module equals math", _module_property),
        _kernel_property("batch independence", _batch_independence),
        Property("gradients equal math", _gradients_property),
    )
}


def attention_target(
    backend: str | AttentionBackend, *, device: str | None = None, max_examples: int = DEFAULT_EXAMPLES
) -> AttentionTarget:
    """The [`AttentionTarget`][diffit_toolkit.testing.attention.AttentionTarget] of a backend or a
    registered name."""
    if isinstance(backend, str):
        backend = attention_backends.get(backend)
    if not isinstance(backend, AttentionBackend):
        raise TypeError(f"expected a registered attention backend name or an AttentionBackend, got {backend!r}")
    return AttentionTarget(backend, device, max_examples)


def attention_backend_checks(
    backend: str | AttentionBackend, *, device: str | None = None, max_examples: int = DEFAULT_EXAMPLES
) -> list[PropertyCheck]:
    """One check per property of an attention backend, for ``@pytest.mark.parametrize`` (one test
    each; arguments as
    [`check_attention_backend`][diffit_toolkit.testing.attention.check_attention_backend])."""
    target = attention_target(backend, device=device, max_examples=max_examples)
    return bind(target.spec.name, target, ATTENTION_PROPERTIES.values())


def check_attention_backend(
    backend: str | AttentionBackend,
    *,
    device: str | None = None,
    max_examples: int = DEFAULT_EXAMPLES,
) -> ConformanceReport:
    """Check an attention backend against the ``math`` reference; raise on the first failure.

    Every case draws only what the backend declares it takes (its ``dtypes``, ``supports_bias``,
    ``max_head_dim``); the reference is ``attention_math`` in float64, and the tolerance is
    [`TOLERANCE`][diffit_toolkit.testing.attention.TOLERANCE] of the input dtype. Properties (see
    [`ATTENTION_PROPERTIES`][diffit_toolkit.testing.attention.ATTENTION_PROPERTIES]):

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
        A [`ConformanceReport`][diffit_toolkit.testing.core.ConformanceReport]; ``skipped`` names
        properties that cannot run here.

    Raises:
        unittest.SkipTest: the backend is unavailable in this process or does not run on the
            device (pytest reports the test as skipped, with the reason).
        ConformanceError: one line naming the backend, the property and the failing case.
    """
    target = attention_target(backend, device=device, max_examples=max_examples)
    target.require_available()
    return run_checks(target.subject, bind(target.spec.name, target, ATTENTION_PROPERTIES.values()))
