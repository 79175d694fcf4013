"""Building blocks of binlat.nn against independent reference computations.

The references below are written from the equations in tests/fixtures/conformance/README.md
("Numerical conventions"), in plain tensor arithmetic (mostly float64); they never call binlat helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from binlat.generators import DiffusionConfig
from binlat.generators.diffusion import DiffusionBlock
from binlat.nn import (
    AdaLNContinuous,
    AdaLNZero,
    Attention,
    GeluMLP,
    KVCache,
    RMSNorm,
    SwiGLU,
    TimestepEmbedding,
    apply_rotary,
    attention_mask,
    layer_norm,
    modulate,
    rotary_tables,
)
from binlat.nn.attention import attend

EPS = 1e-6


def randomize(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Give every parameter a non-trivial random value (norm weights != 1, biases != 0, ...)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


# ----------------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------------


def ref_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w.double()


def ref_layer_norm(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased
    return (x - mu) / torch.sqrt(var + EPS)


def ref_silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def ref_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def lin(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    y = x.double() @ layer.weight.double().T
    return y if layer.bias is None else y + layer.bias.double()


def ref_tables(positions: list[list[float]], axes: tuple[int, ...], theta: float = 10000.0):
    """Explicit per-element formula: for axis a, m-th frequency 1/theta^(2m/d_a), angle pos*freq in float64,
    cos/sin rounded to float32, each value repeated twice in place, axes concatenated."""
    dh = sum(axes)
    cos = torch.zeros(len(positions), dh, dtype=torch.float32)
    sin = torch.zeros(len(positions), dh, dtype=torch.float32)
    for t, pos in enumerate(positions):
        off = 0
        for a, d in enumerate(axes):
            p = float(torch.tensor(pos[a], dtype=torch.float32))  # positions are float32, widened
            for m in range(d // 2):
                ang = p * (1.0 / theta ** (2 * m / d))
                for r in (0, 1):
                    cos[t, off + 2 * m + r] = math.cos(ang)
                    sin[t, off + 2 * m + r] = math.sin(ang)
            off += d
    return cos, sin


def ref_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x'_d = x_d cos_d - x_{d+h} sin_d (d < h), x'_d = x_d cos_d + x_{d-h} sin_d (d >= h), h = Dh/2."""
    x = x.double()
    cos, sin = cos.double(), sin.double()
    dh = x.shape[-1]
    h = dh // 2
    out = torch.empty_like(x)
    for d in range(dh):
        if d < h:
            out[..., d] = x[..., d] * cos[:, d] - x[..., d + h] * sin[:, d]
        else:
            out[..., d] = x[..., d] * cos[:, d] + x[..., d - h] * sin[:, d]
    return out


def ref_attention(attn: Attention, x, context=None, context_mask=None, causal=False, rotary=None):
    """softmax(q k^T / sqrt(Dh)) v with per-head RMSNorm of q and k, queries = rows of x only,
    keys/values = [context ; x], masked keys get zero weight, causal aligned bottom-right."""
    b, lq, _ = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    src = x if context is None else torch.cat((context, x), dim=1)
    lk = src.shape[1]
    q = lin(x, attn.to_q).view(b, lq, H, Dh)
    k = lin(src, attn.to_k).view(b, lk, H, Dh)
    v = lin(src, attn.to_v).view(b, lk, H, Dh)
    q = ref_rms(q, attn.norm_q.weight.detach())
    k = ref_rms(k, attn.norm_k.weight.detach())
    if rotary is not None:
        cos, sin = rotary
        q = ref_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2)
        k = ref_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(Dh)
    allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if context_mask is not None:
        valid = torch.cat((context_mask.bool(), torch.ones(b, lq, dtype=torch.bool)), dim=1)
        allowed &= valid[:, None, None, :]
    if causal:
        for i in range(lq):
            for j in range(lk):
                if j > i + (lk - lq):
                    allowed[:, :, i, j] = False
    scores = scores.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, lq, H * Dh)
    return lin(out, attn.to_out)


# ----------------------------------------------------------------------------------------------------------
# Norms and modulation
# ----------------------------------------------------------------------------------------------------------


def test_rmsnorm_float32_matches_reference():
    torch.manual_seed(0)
    norm = randomize(RMSNorm(24))
    x = torch.randn(3, 5, 24) * 3
    torch.testing.assert_close(norm(x).double(), ref_rms(x, norm.weight.detach()), atol=1e-5, rtol=1e-5)


def test_rmsnorm_bfloat16_casts_back_before_weight():
    torch.manual_seed(1)
    norm = randomize(RMSNorm(64), std=1.0).to(torch.bfloat16)
    x = (torch.randn(8, 64) * 5).to(torch.bfloat16)
    w = norm.weight.detach()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    h = x.float()
    normalised = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16)
    expected = normalised * w
    assert torch.equal(out, expected)
    # The order matters: multiplying by the weight in float32 and casting afterwards gives other values,
    # so the equality above really pins the convention.
    other = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(torch.bfloat16)
    assert not torch.equal(out, other)


def test_layer_norm_no_affine():
    torch.manual_seed(2)
    x = torch.randn(4, 6, 32) * 2 + 1
    x[0, 0] = torch.randn(32) * 1e-3  # tiny variance: the eps value matters here
    out = layer_norm(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), ref_layer_norm(x), atol=2e-5, rtol=1e-5)


def test_modulate():
    torch.manual_seed(3)
    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8)
    expected = torch.empty(2, 5, 8)
    for b in range(2):
        for t in range(5):
            expected[b, t] = x[b, t] * (1 + scale[b]) + shift[b]
    torch.testing.assert_close(modulate(x, shift, scale), expected, atol=1e-6, rtol=1e-6)


def test_adaln_zero_chunk_order():
    torch.manual_seed(4)
    D = 8
    ada = randomize(AdaLNZero(D))
    cond = torch.randn(3, D)
    out = ada(cond)
    assert len(out) == 6
    full = lin(ref_silu(cond.double()), ada.linear)
    # (shift1, scale1, gate1, shift2, scale2, gate2): chunk i is columns [i*D, (i+1)*D) of the linear layer
    for i, chunk in enumerate(out):
        assert chunk.shape == (3, D)
        torch.testing.assert_close(chunk.double(), full[:, i * D : (i + 1) * D], atol=1e-5, rtol=1e-5)


def test_adaln_zero_starts_as_identity():
    torch.manual_seed(5)
    ada = AdaLNZero(16)
    assert torch.count_nonzero(ada.linear.weight) == 0 and torch.count_nonzero(ada.linear.bias) == 0
    assert all(torch.count_nonzero(c) == 0 for c in ada(torch.randn(2, 16)))
    cfg = DiffusionConfig(num_bits=4, num_tokens=5, num_layers=1, num_heads=2, head_dim=8, text_dim=6)
    block = DiffusionBlock(cfg)
    x = torch.randn(2, 5, 16)
    out = block(x, torch.randn(2, 16), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(out, x)
    # once the modulation is non-zero the block is no longer the identity (the check above can fail)
    randomize(block.adaln)
    out = block(x, torch.randn(2, 16), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    assert not torch.allclose(out, x, atol=1e-3)


def test_adaln_continuous_scale_then_shift():
    torch.manual_seed(6)
    D = 12
    ada = randomize(AdaLNContinuous(D))
    x, cond = torch.randn(2, 4, D) * 2, torch.randn(2, D)
    full = lin(ref_silu(cond.double()), ada.linear)
    scale, shift = full[:, :D], full[:, D:]
    expected = ref_layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(ada(x, cond).double(), expected, atol=1e-5, rtol=1e-5)
    swapped = ref_layer_norm(x) * (1 + shift[:, None]) + scale[:, None]
    assert not torch.allclose(ada(x, cond).double(), swapped, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------
# MLPs and timestep embedding
# ----------------------------------------------------------------------------------------------------------


def test_swiglu():
    torch.manual_seed(7)
    mlp = SwiGLU(8, 32)
    assert mlp.gate.bias is None and mlp.up.bias is None and mlp.down.bias is None
    x = torch.randn(2, 3, 8)
    expected = lin(ref_silu(lin(x, mlp.gate)) * lin(x, mlp.up), mlp.down)
    torch.testing.assert_close(mlp(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_gelu_mlp_uses_tanh_gelu():
    torch.manual_seed(8)
    mlp = randomize(GeluMLP(8, 32), std=1.0)
    x = torch.randn(2, 3, 8) * 2
    expected = lin(ref_gelu_tanh(lin(x, mlp.fc1)), mlp.fc2)
    torch.testing.assert_close(mlp(x).double(), expected, atol=1e-5, rtol=1e-5)
    exact = lin(torch.nn.functional.gelu(lin(x, mlp.fc1)), mlp.fc2)  # erf GELU: a different function
    assert not torch.allclose(mlp(x).double(), exact, atol=1e-5)


def test_timestep_embedding_raw_scalar():
    torch.manual_seed(9)
    emb = randomize(TimestepEmbedding(16))
    assert emb.fc1.in_features == 1
    t = torch.tensor([0.9, 0.5, 0.05, 0.0])
    expected = lin(ref_silu(lin(t[:, None], emb.fc1)), emb.fc2)
    out = emb(t)
    assert out.shape == (4, 16)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Rotary
# ----------------------------------------------------------------------------------------------------------


def test_rotary_tables_explicit_formula():
    axes = (2, 4, 6)
    positions = [[0, 0, 0], [3, 0, 0], [0, 2, 5], [0, 1.5, 7.25], [1, 11.0, 0.5]]
    cos, sin = rotary_tables(torch.tensor(positions, dtype=torch.float32), axes)
    assert cos.shape == sin.shape == (5, 12) and cos.dtype == sin.dtype == torch.float32
    rc, rs = ref_tables(positions, axes)
    torch.testing.assert_close(cos, rc, atol=1e-7, rtol=0)
    torch.testing.assert_close(sin, rs, atol=1e-7, rtol=0)
    # interleaved repetition: [c0, c0, c1, c1, ...] within each axis block
    assert torch.equal(cos[:, 0::2], cos[:, 1::2])


def test_rotary_tables_angles_in_float64():
    # Large positions: an angle formed in float32 would be off by ~1e-3; float64 angles are exact to float32.
    axes = (2, 2, 4)
    positions = [[12345.678, 20001.5, 30011.25]]
    cos, sin = rotary_tables(torch.tensor(positions, dtype=torch.float32), axes)
    rc, rs = ref_tables(positions, axes)
    torch.testing.assert_close(cos, rc, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, rs, atol=1e-6, rtol=0)


def test_apply_rotary_half_split_pairing():
    torch.manual_seed(10)
    axes = (2, 2, 4)
    pos = torch.tensor([[0, 0, 0], [1, 2, 3], [0, 5, 1], [4, 0, 9]], dtype=torch.float32)
    cos, sin = rotary_tables(pos, axes)
    x = torch.randn(2, 3, 4, 8)  # [B, H, L, Dh]
    out = apply_rotary(x, cos, sin)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ref_rotary(x, cos, sin), atol=1e-6, rtol=1e-6)
    # not the textbook (2m, 2m+1) pairing
    textbook = x.clone()
    textbook[..., 0::2] = x[..., 0::2] * cos[:, 0::2] - x[..., 1::2] * sin[:, 0::2]
    textbook[..., 1::2] = x[..., 1::2] * cos[:, 1::2] + x[..., 0::2] * sin[:, 1::2]
    assert not torch.allclose(out, textbook, atol=1e-3)
    # bfloat16 in, bfloat16 out
    assert apply_rotary(x.to(torch.bfloat16), cos, sin).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------


def make_attention(seed: int = 11, dim: int = 16, heads: int = 2, head_dim: int = 8) -> Attention:
    torch.manual_seed(seed)
    return randomize(Attention(dim, heads, head_dim))


def test_attention_self_matches_explicit_softmax():
    attn = make_attention()
    x = torch.randn(2, 5, 16)
    out = attn(x)
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out.double(), ref_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_attention_trains_in_float32_under_cpu_bf16_autocast():
    """attend(): under CPU bf16 autocast with gradients, attention runs in float32 on the bf16 projections (PyTorch's
    bf16 CPU attention backward is ~3x slower than float32's at the generators' sizes); gradients reach the inputs.
    Without gradients (sampling) autocast keeps it bf16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8).to(torch.bfloat16).requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, None)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    out.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert attend(q.float(), k.float(), v.float(), None).dtype == torch.bfloat16


def test_attention_with_rotary_matches_reference():
    attn = make_attention(12)
    pos = torch.tensor(
        [[k, 0, 0] for k in range(2)] + [[0, r, c] for r in range(2) for c in range(2)], dtype=torch.float32
    )
    rot = rotary_tables(pos, (2, 2, 4))
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(attn(x, rotary=rot).double(), ref_attention(attn, x, rotary=rot), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(attn(x, rotary=rot), attn(x), atol=1e-4)


def test_attention_context_rows_are_keys_not_queries():
    attn = make_attention(13)
    x, ctx = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    out = attn(x, context=ctx)
    assert out.shape == (3, 4, 16)  # one output row per row of x, none for the context
    torch.testing.assert_close(out.double(), ref_attention(attn, x, ctx), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, attn(x), atol=1e-4)  # the context does contribute keys


def test_attention_padded_context_key_gets_zero_weight():
    attn = make_attention(14)
    x, ctx = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    out = attn(x, context=ctx, context_mask=mask)
    torch.testing.assert_close(out.double(), ref_attention(attn, x, ctx, mask), atol=1e-5, rtol=1e-5)
    ctx2 = torch.where(mask[..., None], ctx, torch.randn_like(ctx) * 100)
    torch.testing.assert_close(attn(x, context=ctx2, context_mask=mask), out, atol=1e-6, rtol=0)
    # changing a valid key does change the output
    ctx3 = ctx.clone()
    ctx3[:, -1] += 5
    assert not torch.allclose(attn(x, context=ctx3, context_mask=mask), out, atol=1e-4)


def test_attention_mask_bottom_right_causal():
    m = attention_mask(None, 3, 5, True, torch.device("cpu"))
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert m.shape == (1, 1, 3, 5)
    assert torch.equal(m[0, 0], expected)
    valid = torch.tensor([[True] * 5, [False, True, True, True, True]])
    m2 = attention_mask(valid, 3, 5, True, torch.device("cpu"))
    assert m2.shape == (2, 1, 3, 5)
    assert torch.equal(m2[0, 0], expected)
    assert torch.equal(m2[1, 0], expected & valid[1][None, :])
    m3 = attention_mask(valid, 2, 5, False, torch.device("cpu"))
    assert torch.equal(m3.expand(2, 1, 2, 5)[:, 0], valid[:, None, :].expand(2, 2, 5))  # broadcastable
    assert attention_mask(None, 4, 4, False, torch.device("cpu")) is None
    sq = attention_mask(None, 4, 4, True, torch.device("cpu"))
    assert torch.equal(sq[0, 0], torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_attention_causal_with_context_matches_reference_and_ignores_later_rows():
    attn = make_attention(15)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    out = attn(x, context=ctx, context_mask=mask, causal=True)
    torch.testing.assert_close(out.double(), ref_attention(attn, x, ctx, mask, causal=True), atol=1e-5, rtol=1e-5)
    for i in range(4):
        x2 = x.clone()
        x2[:, i + 1 :] = torch.randn_like(x2[:, i + 1 :]) * 10
        out2 = attn(x2, context=ctx, context_mask=mask, causal=True)
        torch.testing.assert_close(out2[:, : i + 1], out[:, : i + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out2[:, i + 1 :], out[:, i + 1 :], atol=1e-4)
    # every image row sees all the (valid) text: changing a text row changes row 0
    ctx2 = ctx.clone()
    ctx2[:, 2] += 3
    assert not torch.allclose(attn(x, context=ctx2, context_mask=mask, causal=True)[:, 0], out[:, 0], atol=1e-4)


def test_attention_kv_cache_equals_full_causal_call():
    attn = make_attention(16)
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    mask = torch.tensor([[1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    full = attn(x, context=ctx, context_mask=mask, causal=True)
    cache = KVCache()
    parts = [attn(x[:, :2], context=ctx, context_mask=mask, causal=True, cache=cache)]
    assert len(cache) == 5
    for j in range(2, 6):
        parts.append(attn(x[:, j : j + 1], causal=True, cache=cache))
    assert len(cache) == 9
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_repeat_batch():
    attn = make_attention(17)
    x, ctx = torch.randn(1, 3, 16), torch.randn(1, 2, 16)
    mask = torch.tensor([[0, 1]], dtype=torch.bool)
    cache = KVCache()
    attn(x[:, :2], context=ctx, context_mask=mask, causal=True, cache=cache)
    cache.repeat_batch(3)
    nxt = torch.randn(3, 1, 16)
    got = attn(nxt, causal=True, cache=cache)
    for b in range(3):
        seq = torch.cat((x[:, :2], nxt[b : b + 1]), dim=1)
        want = attn(seq, context=ctx, context_mask=mask, causal=True)[:, 2:]
        torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# float32 and bfloat16
# ----------------------------------------------------------------------------------------------------------


def _cases():
    D = 16

    def attn_ctx(m, x, c, mask):
        return m(x, context=c, context_mask=mask, causal=True)

    def attn_rot(m, x, c, mask):
        pos = torch.tensor([[0, r, c_] for r in range(2) for c_ in range(2)], dtype=torch.float32)
        return m(x, rotary=rotary_tables(pos, (2, 2, 4)))

    return {
        "rmsnorm": (lambda: RMSNorm(D), lambda m, x, c, mask: m(x)),
        "layer_norm": (lambda: torch.nn.Identity(), lambda m, x, c, mask: layer_norm(m(x))),
        "adaln_zero": (lambda: AdaLNZero(D), lambda m, x, c, mask: torch.cat(m(x[:, 0]), -1)),
        "adaln_continuous": (lambda: AdaLNContinuous(D), lambda m, x, c, mask: m(x, x[:, 0])),
        "swiglu": (lambda: SwiGLU(D, 4 * D), lambda m, x, c, mask: m(x)),
        "gelu_mlp": (lambda: GeluMLP(D, 4 * D), lambda m, x, c, mask: m(x)),
        "timestep": (lambda: TimestepEmbedding(D), lambda m, x, c, mask: m(x[:, 0, 0].sigmoid())),
        "attention_context_causal": (lambda: Attention(D, 2, 8), attn_ctx),
        "attention_rotary": (lambda: Attention(D, 2, 8), attn_rot),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_blocks_float32_and_bfloat16(name):
    make, call = _cases()[name]
    torch.manual_seed(20)
    module = randomize(make(), std=0.2)
    x, ctx = torch.randn(2, 4, 16), torch.randn(2, 3, 16)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    ref = call(module, x, ctx, mask)
    assert ref.dtype == torch.float32 and torch.isfinite(ref).all()
    module = module.to(torch.bfloat16)
    out = call(module, x.to(torch.bfloat16), ctx.to(torch.bfloat16), mask)
    assert out.dtype == torch.bfloat16
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1 * max(1.0, ref.abs().max().item()), rtol=0.05)


@pytest.mark.parametrize("dim", [8, 7])
def test_sincos_positions_table(dim):
    from binlat.nn import sincos_positions

    table = sincos_positions(5, dim)
    assert table.shape == (1, 5, dim)
    assert torch.equal(table[0, 0, 0::2], torch.zeros((dim + 1) // 2))  # sin(0)
    assert torch.equal(table[0, 0, 1::2], torch.ones(dim // 2))  # cos(0)
    assert torch.allclose(table[0, 3, 0], torch.sin(torch.tensor(3.0)))  # channel 0 has frequency 1
    # Every position is told apart from every other: the point of starting from it rather than from zeros.
    distances = torch.cdist(table[0], table[0])
    assert (distances + torch.eye(5)).min() > 0.1


def test_fresh_generators_start_with_distinct_positions():
    from binlat.generators import ARTransformer, DiffusionTransformer

    shared = dict(num_bits=4, num_tokens=6, num_layers=1, num_heads=2, head_dim=8, text_dim=8)
    for network in (DiffusionTransformer, ARTransformer):
        model = network(network.config_class(**shared))
        pos = model.blocks[0].pos_emb[0]
        assert (torch.cdist(pos, pos) + torch.eye(pos.shape[0])).min() > 0.1
