"""DiT's conditioning alternatives and PixArt-alpha's adaLN-single, each against an independent
implementation of its source, the identities its maths promises, and its published cost."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diffit_toolkit.backbones import latent_diffit
from diffit_toolkit.backbones.info import model_facts
from diffit_toolkit.nn.block import BlockSpec, Conditioning, ConditioningMechanism, DiffiTBlock, Injection

SETTINGS = settings(max_examples=12, deadline=None)


class NoSite(ConditioningMechanism):
    """Fills no site: the plain pre-norm block ``x + Attn(LN x)``, ``x + MLP(LN x)``."""

    def forward(self, c):
        return Injection()


# -- an independent transformer block, written from the papers with the toolkit's weights -----


def ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def mha(xq, xkv, wq, bq, wk, bk, wv, bv, wo, bo, heads, bias=None):
    """Multi-head attention ``softmax(q k^T / sqrt(d) + bias) v`` (Vaswani et al.), then the output map."""
    B, N, D = xq.shape
    d = D // heads
    q = (xq @ wq.T + bq).reshape(B, N, heads, d).transpose(1, 2)
    k = (xkv @ wk.T + bk).reshape(B, xkv.shape[1], heads, d).transpose(1, 2)
    v = (xkv @ wv.T + bv).reshape(B, xkv.shape[1], heads, d).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / d**0.5
    if bias is not None:
        logits = logits + bias
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D) @ wo.T + bo


def self_attention(block, h, bias=None):
    wq, wk, wv = block.attn.qkv.weight.chunk(3)  # output layout (3, heads, head_dim)
    bq, bk, bv = block.attn.qkv.bias.chunk(3)
    return mha(h, h, wq, bq, wk, bk, wv, bv, block.attn.proj.weight, block.attn.proj.bias, block.spec.num_heads, bias)


def mlp(block, h):
    return F.linear(F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias), approximate="tanh"),
                    block.mlp.fc2.weight, block.mlp.fc2.bias)


def perturbed(block, seed):
    """Every parameter moved off its init (zero inits would hide terms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return block.eval()


def build(spec, mechanism, seed, **kwargs):
    torch.manual_seed(seed)
    return perturbed(DiffiTBlock(spec, mechanism, **kwargs).double(), seed)


def embeddings(batch, n, dim, cond_dim, conditional, seed):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, n, dim, generator=g, dtype=torch.float64)
    t = torch.randn(batch, cond_dim, generator=g, dtype=torch.float64)
    y = torch.randn(batch, cond_dim, generator=g, dtype=torch.float64) if conditional else None
    return x, Conditioning(t, y)


shapes = st.fixed_dictionaries({
    "heads": st.integers(1, 3), "head_dim": st.sampled_from([4, 8]), "side": st.integers(1, 3),
    "batch": st.integers(1, 3), "conditional": st.booleans(), "seed": st.integers(0, 2**16),
})


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# -- cross-attention ----------------------------------------------------------------------------


@SETTINGS
@given(shapes, st.sampled_from([4, 8, 12]))
def test_cross_attention_block_is_dits(case, cond_dim):
    """DiT Sec. 3.2: self-attention, then multi-head cross-attention to the length-two sequence
    [t_emb, y_emb], then the MLP, each pre-norm and residual."""
    dim, n = case["heads"] * case["head_dim"], case["side"] ** 2
    spec = BlockSpec(dim=dim, num_heads=case["heads"], cond_dim=cond_dim, grid=(case["side"],) * 2)
    block = build(spec, "cross_attention", case["seed"])
    x, cond = embeddings(case["batch"], n, dim, cond_dim, case["conditional"], case["seed"])
    with torch.no_grad():
        got = block(x, cond)
        ca = block.cross_attn
        wk, wv = ca.kv.weight.chunk(2)
        bk, bv = ca.kv.bias.chunk(2)
        context = torch.stack([cond.t, cond.y], 1) if cond.y is not None else cond.t[:, None]  # (B, 2, cond_dim)
        ref = x + self_attention(block, ln(x))
        ref = ref + mha(ln(ref), context, ca.q.weight, ca.q.bias, wk, bk, wv, bv, ca.proj.weight, ca.proj.bias,
                        case["heads"])
        ref = ref + mlp(block, ln(ref))
    close(got, ref)
    assert sum(p.numel() for p in block.cond.parameters()) == 0  # the layer is the block's


def equals_plain_block_once_zeroed(case, window, bias, mechanism, zeroed, extra_keys):
    """A block of ``mechanism`` whose ``zeroed`` linear (a function of the block) is set to zero
    equals the plain pre-norm block with the same remaining weights (windows, bias and all)."""
    side = 2 * case["side"]
    dim = case["heads"] * case["head_dim"]
    spec = BlockSpec(dim=dim, num_heads=case["heads"], cond_dim=8, grid=(side, side), window=window, rel_pos_bias=bias)
    block = build(spec, mechanism, case["seed"])
    with torch.no_grad():
        zeroed(block).weight.zero_()
        zeroed(block).bias.zero_()
    plain = DiffiTBlock(spec, NoSite).double().eval()
    missing, unexpected = plain.load_state_dict(block.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith(extra_keys) for k in unexpected)
    x, cond = embeddings(case["batch"], side * side, dim, 8, case["conditional"], case["seed"])
    with torch.no_grad():
        close(block(x, cond), plain(x, cond))


@SETTINGS
@given(shapes, st.sampled_from([None, 2]), st.booleans())
def test_zero_cross_attention_output_is_the_block_without_it(case, window, bias):
    equals_plain_block_once_zeroed(case, window, bias, "cross_attention", lambda b: b.cross_attn.proj, "cross_attn.")


# -- in-context ---------------------------------------------------------------------------------


@SETTINGS
@given(shapes, st.booleans(), st.integers(1, 3))
def test_in_context_stack_is_dits(case, rel_pos_bias, depth):
    """DiT Sec. 3.2: t_emb and y_emb appended as two tokens, treated like image tokens by every
    block (here with a relative position bias among the image tokens only), removed after the last."""
    dim, side = case["heads"] * case["head_dim"], case["side"]
    n = side * side
    spec = BlockSpec(dim=dim, num_heads=case["heads"], cond_dim=dim, grid=(side, side), rel_pos_bias=rel_pos_bias)
    blocks = [build(spec, "in_context", case["seed"] + i) for i in range(depth)]
    x, cond = embeddings(case["batch"], n, dim, dim, case["conditional"], case["seed"])
    with torch.no_grad():
        h = x
        for block in blocks:
            h = block(h, cond)
        got = h[:, :n]

        extra = [cond.t[:, None]] + ([cond.y[:, None]] if cond.y is not None else [])
        z = torch.cat([x, *extra], 1)  # (B, N + 2, D)
        for block in blocks:
            bias = None
            if rel_pos_bias:  # the image tokens' relative bias, zero for every pair with a conditioning token
                m = z.shape[1] - n
                bias = F.pad(block.attn.relative_bias(), (0, m, 0, m))
            z = z + self_attention(block, ln(z), bias)
            z = z + mlp(block, ln(z))
        ref = z[:, :n]
    assert h.shape[1] == n + len(extra)
    close(got, ref)


def test_in_context_latent_backbone_appends_once_and_drops_before_the_final_layer():
    torch.manual_seed(0)
    model = perturbed(latent_diffit(None, input_size=8, hidden_size=16, num_heads=2, depth=2, num_classes=5,
                                    mechanism="in_context").double(), 0)
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([3, 700]), torch.tensor([1, 4])
    with torch.no_grad():
        got = model(x, t, y)
        h = model.x_embedder(x) + model.pos_embed
        z = torch.cat([h, model.t_embedder(t)[:, None], model.y_embedder(y, False)[:, None]], 1)
        for block in model.blocks:
            z = z + self_attention(block, ln(z), F.pad(block.attn.relative_bias(), (0, 2, 0, 2)))
            z = z + mlp(block, ln(z))
        c = model.t_embedder(t) + model.y_embedder(y, False)
        out = model.final_layer(z[:, :16], c)
    from diffit_toolkit.backbones.layers import unpatchify

    close(got, unpatchify(out, 2, model.out_channels))
    assert not list(model.blocks[0].cond.parameters())  # equal widths: the embeddings as they are


# -- adaLN ---------------------------------------------------------------------------------------


@SETTINGS
@given(shapes, st.sampled_from([4, 8]))
def test_adaln_block_is_dits(case, cond_dim):
    """DiT Sec. 3.2: scale and shift regressed from c modulate both LayerNorms; no gates."""
    dim, n = case["heads"] * case["head_dim"], case["side"] ** 2
    spec = BlockSpec(dim=dim, num_heads=case["heads"], cond_dim=cond_dim, grid=(case["side"],) * 2)
    block = build(spec, "adaln", case["seed"])
    x, cond = embeddings(case["batch"], n, dim, cond_dim, case["conditional"], case["seed"])
    with torch.no_grad():
        got = block(x, cond)
        lin = block.cond.adaLN_modulation[1]
        shift_a, scale_a, shift_m, scale_m = F.linear(F.silu(cond.c), lin.weight, lin.bias)[:, None].chunk(4, -1)
        ref = x + self_attention(block, ln(x) * (1 + scale_a) + shift_a)
        ref = ref + mlp(block, ln(ref) * (1 + scale_m) + shift_m)
    close(got, ref)


@SETTINGS
@given(shapes, st.sampled_from([None, 2]), st.booleans())
def test_adaln_with_zero_modulation_is_the_plain_pre_norm_block(case, window, bias):
    equals_plain_block_once_zeroed(case, window, bias, "adaln", lambda b: b.cond.adaLN_modulation[1], "cond.")


def test_adaln_has_no_gates_and_no_zero_init():
    spec = BlockSpec(dim=16, num_heads=2, cond_dim=16, grid=(2, 2))
    block = DiffiTBlock(spec, "adaln")
    inj = block.injection(torch.randn(2, 16))
    assert inj.gate_attn is None and inj.gate_mlp is None
    assert block.cond.adaLN_modulation[1].weight.abs().sum() > 0 and not block.cond.identity_at_init
    assert block.cond.final_layer == "adaln"


# -- adaLN-single ----------------------------------------------------------------------------

def _diffusers_pixart_block(block):
    """diffusers' PixArt block (``BasicTransformerBlock``, ``norm_type="ada_norm_single"``) with
    this block's weights."""
    from diffusers.models.attention import BasicTransformerBlock

    spec = block.spec
    theirs = BasicTransformerBlock(spec.dim, spec.num_heads, spec.head_dim, activation_fn="gelu-approximate",
                                   norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                   attention_bias=True).double().eval()
    wq, wk, wv = block.attn.qkv.weight.chunk(3)
    bq, bk, bv = block.attn.qkv.bias.chunk(3)
    state = {
        "scale_shift_table": block.cond.scale_shift_table,
        "attn1.to_q.weight": wq, "attn1.to_q.bias": bq, "attn1.to_k.weight": wk, "attn1.to_k.bias": bk,
        "attn1.to_v.weight": wv, "attn1.to_v.bias": bv,
        "attn1.to_out.0.weight": block.attn.proj.weight, "attn1.to_out.0.bias": block.attn.proj.bias,
        "ff.net.0.proj.weight": block.mlp.fc1.weight, "ff.net.0.proj.bias": block.mlp.fc1.bias,
        "ff.net.2.weight": block.mlp.fc2.weight, "ff.net.2.bias": block.mlp.fc2.bias,
    }
    theirs.load_state_dict(state)
    return theirs


@SETTINGS
@given(shapes)
def test_adaln_single_block_is_pixarts(case):
    """PixArt-alpha Sec. 2.3 as in diffusers: ``(scale_shift_table[None] + t.reshape(B, 6, -1))``
    split into shift, scale, gate for attention and MLP, ``t2i_modulate(x, shift, scale) =
    x * (1 + scale) + shift``."""
    pytest.importorskip("diffusers")
    dim, n = case["heads"] * case["head_dim"], case["side"] ** 2
    spec = BlockSpec(dim=dim, num_heads=case["heads"], cond_dim=dim, grid=(case["side"],) * 2)
    block = build(spec, "adaln_single", case["seed"])
    x, cond = embeddings(case["batch"], n, dim, dim, case["conditional"], case["seed"])
    shared = torch.randn(case["batch"], 6 * dim, generator=torch.Generator().manual_seed(case["seed"]),
                         dtype=torch.float64)
    with torch.no_grad():
        got = block(x, cond._replace(shared=shared))
        ref = _diffusers_pixart_block(block)(x, timestep=shared)
    close(got, ref)


def test_adaln_single_shared_modulation_is_diffusers_ada_layer_norm_single():
    """The backbone's time MLP and shared linear are diffusers' ``AdaLayerNormSingle``: same
    parameters, same output."""
    pytest.importorskip("diffusers")
    from diffusers.models.normalization import AdaLayerNormSingle

    torch.manual_seed(0)
    D = 32
    model = perturbed(latent_diffit(None, input_size=8, hidden_size=D, num_heads=2, depth=3, num_classes=0,
                                    mechanism="adaln_single").double(), 0)
    theirs = AdaLayerNormSingle(D).double().eval()
    emb = theirs.emb.timestep_embedder
    theirs.load_state_dict({
        "emb.timestep_embedder.linear_1.weight": model.t_embedder.mlp[0].weight,
        "emb.timestep_embedder.linear_1.bias": model.t_embedder.mlp[0].bias,
        "emb.timestep_embedder.linear_2.weight": model.t_embedder.mlp[2].weight,
        "emb.timestep_embedder.linear_2.bias": model.t_embedder.mlp[2].bias,
        "linear.weight": model.shared_conditioning.linear.weight,
        "linear.bias": model.shared_conditioning.linear.bias,
    })
    assert emb.linear_1.in_features == model.t_embedder.mlp[0].in_features == 256
    t = torch.tensor([0.0, 17.0, 999.0], dtype=torch.float64)
    with torch.no_grad():
        ours = model.shared_conditioning(model.t_embedder(t))
        modulation, _ = theirs(t, {"resolution": None, "aspect_ratio": None}, batch_size=3, hidden_dtype=torch.float64)
    torch.testing.assert_close(ours, modulation, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("width", [64, 1152])
def test_adaln_single_parameters_are_ada_layer_norm_single_plus_one_table_per_block(width):
    pytest.importorskip("diffusers")
    from diffusers.models.normalization import AdaLayerNormSingle

    depth = 4
    with torch.device("meta"):
        model = latent_diffit(None, input_size=8, hidden_size=width, num_heads=2, depth=depth, num_classes=0,
                              mechanism="adaln_single")
        theirs = AdaLayerNormSingle(width)

    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    ours = count(model.t_embedder, model.shared_conditioning, *(b.cond for b in model.blocks))
    assert ours == count(theirs) + depth * 6 * width


def test_adaln_single_saves_most_of_adaln_zeros_parameters_at_xl2():
    zero, single = model_facts("dit", "XL/2"), model_facts("dit", "XL/2", mechanism="adaln_single")
    per_block = 1152 * 6 * 1152 + 6 * 1152
    assert zero.params - single.params == 28 * per_block - (per_block + 28 * 6 * 1152) == 214_983_936
    assert single.params == 460_145_696


def test_adaln_single_without_its_shared_modulation_is_a_one_line_error():
    block = DiffiTBlock(BlockSpec(dim=8, num_heads=1, cond_dim=8, grid=(2, 2)), "adaln_single")
    with pytest.raises(ValueError, match="adaln_single reads the modulation") as info:
        block(torch.randn(1, 4, 8), torch.randn(1, 8))
    assert "\n" not in str(info.value)


# -- the interface -------------------------------------------------------------------------------


def test_a_mechanism_that_does_not_take_parts_gets_their_sum():
    torch.manual_seed(0)
    block = DiffiTBlock(BlockSpec(dim=8, num_heads=2, cond_dim=8, grid=(2, 2), rel_pos_bias=True), "tmsa").eval()
    x, t, y = torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(block(x, Conditioning(t, y)), block(x, t + y))


def test_context_without_a_cross_attention_layer_and_the_reverse_are_one_line_errors():
    class GivesContext(NoSite):
        def forward(self, c):
            return Injection(context=c[:, None])

    spec = BlockSpec(dim=8, num_heads=2, cond_dim=8, grid=(2, 2))
    with pytest.raises(ValueError, match="context tokens need a cross-attention layer"):
        DiffiTBlock(spec, GivesContext)(torch.randn(1, 4, 8), torch.randn(1, 8))
    with_layer = BlockSpec(dim=8, num_heads=2, cond_dim=8, grid=(2, 2), context_dim=8)
    with pytest.raises(ValueError, match="gave none: fill the context site"):
        DiffiTBlock(with_layer, NoSite)(torch.randn(1, 4, 8), torch.randn(1, 8))


def test_appended_tokens_need_the_grid():
    block = DiffiTBlock(BlockSpec(dim=8, num_heads=2, cond_dim=8), "in_context")
    with pytest.raises(ValueError, match="need the token grid"):
        block(torch.randn(1, 4, 8), torch.randn(1, 8))


# -- DiT's published compute (Fig. 3 / Table 4 of DiT: "Gflops" are multiply-accumulates) --------


@pytest.mark.parametrize(("mechanism", "gflops"), [
    ("in_context", 119.4), ("cross_attention", 137.6), ("adaln", 118.6), ("adaln_zero", 118.6),
])
def test_dit_xl2_compute_of_each_block_design_is_dits(mechanism, gflops):
    assert abs(model_facts("dit", "XL/2", mechanism=mechanism).gmacs - gflops) < 0.1
