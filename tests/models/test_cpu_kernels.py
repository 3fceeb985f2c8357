"""Our CPU kernels: they build wherever a C++ compiler is, compute what they claim, and never let a
row's result depend on the other rows of the batch."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from phiserve.models import cpu_kernels, quant

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable here")


def test_kernels_build_where_a_compiler_is():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert cpu_kernels.available(), "the CPU kernels failed to build; the server would fall back to slower torch kernels"


def _weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quant.quantize_int4(torch.randn(n, k, generator=g) * 0.05)


def _dense(q: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor) -> torch.Tensor:
    return q.double() * scale.double().repeat_interleave(32, 1) + min_.double().repeat_interleave(32, 1)


def _int16_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the weight kernels see it: per row and group of 32, rounded (half to even) to int16 steps
    of max|x| / 32767, in float64."""
    m, k = x.shape
    g = x.reshape(m, k // 32, 32)
    amax = g.abs().amax(-1, keepdim=True)
    step = amax / 32767
    # float32 division, as the kernel (a scalar / tensor is reciprocal-then-multiply in torch: 1 ulp off)
    inv = torch.where(amax > 0, torch.full_like(amax, 32767) / amax, torch.zeros_like(amax))
    return (torch.round(g * inv).double() * step.double()).reshape(m, k)


def _kernel_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor | None) -> torch.Tensor:
    """What int4/int8_linear compute: scale * sum(q * x16) on the rounded x, plus min * sum(x) on the exact x."""
    m, k = x.shape
    out = _int16_rows(x) @ (q.double() * scale.double().repeat_interleave(32, 1)).t()
    if min_ is not None:
        out += x.double().reshape(m, k // 32, 32).sum(-1) @ min_.double().t()
    return out


@needs_kernels
@pytest.mark.parametrize("n", [8, 16, 24, 136])
def test_int4_linear_equals_the_dequantized_product(n):
    q, scale, min_ = _weights(n, 96)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(n))
    x[3, 32:64] = 0  # an all-zero group
    out = torch.ops.phiserve.int4_linear(x, *quant.pack_q4(q, scale, min_))
    torch.testing.assert_close(out.double(), _kernel_reference(x, q, scale, min_), rtol=1e-6, atol=1e-6)
    # against the float product: int16 activations cost ~1e-4 of the largest output at most
    ref = x.double() @ _dense(q, scale, min_).t()
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


@needs_kernels
def test_int4_linear_rows_do_not_depend_on_the_batch():
    q, scale, min_ = _weights(72, 128, seed=1)
    packed = quant.pack_q4(q, scale, min_)
    x = torch.randn(11, 128)
    batched = torch.ops.phiserve.int4_linear(x, *packed)
    for m in range(1, 12):  # every row tile (4, 2, 1 rows) and the odd block of features
        assert torch.equal(torch.ops.phiserve.int4_linear(x[:m].contiguous(), *packed), batched[:m])
    for i in range(11):
        assert torch.equal(torch.ops.phiserve.int4_linear(x[i : i + 1].contiguous(), *packed)[0], batched[i])


@needs_kernels
@pytest.mark.parametrize("n", [8, 24, 48])
@pytest.mark.parametrize("rows", [16, 31])
def test_many_rows_take_the_panel_loop_with_the_same_bits(n, rows):
    """From 12 rows (int4; 24 for int8) the weights are unpacked a panel at a time (prefill chunks,
    large decode batches): the same integer dots and FMA chain as the one-row loop, so every row's bits
    equal its own single-row call."""
    g = torch.Generator().manual_seed(n)
    q, scale, min_ = _weights(n, 96, seed=n)
    x = torch.randn(rows, 96, generator=g)  # 6-row tiles and a 4-row (16) or 1-row (31) remainder tile
    x[4, :32] = 0  # an all-zero group
    q4 = quant.pack_q4(q, scale, min_)
    out = torch.ops.phiserve.int4_linear(x, *q4)
    torch.testing.assert_close(out.double(), _kernel_reference(x, q, scale, min_), rtol=1e-6, atol=1e-6)
    q8, s8 = quant.quantize_q8(torch.randn(n, 96, generator=g))
    q8p = quant.pack_q8(q8, s8)
    out8 = torch.ops.phiserve.int8_linear(x, *q8p)
    torch.testing.assert_close(out8.double(), _kernel_reference(x, q8, s8, None), rtol=1e-6, atol=1e-6)
    for i in range(rows):
        assert torch.equal(torch.ops.phiserve.int4_linear(x[i : i + 1].contiguous(), *q4)[0], out[i])
        assert torch.equal(torch.ops.phiserve.int8_linear(x[i : i + 1].contiguous(), *q8p)[0], out8[i])


@needs_kernels
def test_rows_do_not_depend_on_the_batch_across_the_panel_threshold():
    q, scale, min_ = _weights(40, 64, seed=2)  # 5 blocks of 8 features: two full panels and a half one
    packed = quant.pack_q4(q, scale, min_)
    x = torch.randn(38, 64)
    batched = torch.ops.phiserve.int4_linear(x, *packed)
    for m in range(1, 39):  # both loops, full 6-row tiles and every remainder tile
        assert torch.equal(torch.ops.phiserve.int4_linear(x[:m].contiguous(), *packed), batched[:m])


needs_prefill_kernel = pytest.mark.skipif(
    not (cpu_kernels.available() and torch.ops.phiserve.has_prefill_kernel()), reason="no AMX prefill kernel on this CPU"
)


def _bf16_pair_rows(x: torch.Tensor) -> torch.Tensor:
    """x as the AMX prefill kernel sees it: hi = bf16(x) plus lo = bf16(x - hi), in float64."""
    hi = x.bfloat16().float()
    return hi.double() + (x - hi).bfloat16().double()


@needs_prefill_kernel
@pytest.mark.parametrize(("n", "k", "rows"), [(40, 96, 5), (16, 64, 16), (72, 128, 37), (24, 1536, 3)])
def test_prefill_rows_on_amx_are_exact_in_the_weights_and_independent_of_the_batch(n, k, rows):
    """Prefill rows take the tile kernel: int4 weights exact in bf16, activations split in two bf16
    (~16 bits), products summed in fp32 per group, then the scale-and-min chain. Odd group counts, a
    half panel (40 = 5 blocks of 8), row counts around the 16-row tile."""
    g = torch.Generator().manual_seed(k + rows)
    q, scale, min_ = _weights(n, k, seed=n)
    packed = quant.pack_q4(q, scale, min_)
    x = torch.randn(rows, k, generator=g)
    x[rows // 2, :32] = 0  # an all-zero group
    out = torch.ops.phiserve.int4_linear(x, *packed, rows)
    dense = _dense(q, scale, min_)
    torch.testing.assert_close(out.double(), _bf16_pair_rows(x) @ dense.t(), rtol=0, atol=2e-6 * (x.abs().max() * dense.abs().sum(1).max()).item())
    ref = x.double() @ dense.t()
    assert (out.double() - ref).abs().max() <= 2e-5 * ref.abs().max()  # the int16 path's bound is 1e-4
    for i in range(rows):  # alone, in any tile, beside decode rows: the same bits
        assert torch.equal(torch.ops.phiserve.int4_linear(x[i : i + 1].contiguous(), *packed, 1)[0], out[i])
    mixed = torch.ops.phiserve.int4_linear(x, *packed, rows // 2)
    assert torch.equal(mixed[: rows // 2], out[: rows // 2])
    # the rows after the prefill rows are decode rows: the int16 path's bits, as when called alone
    assert torch.equal(mixed[rows // 2 :], torch.ops.phiserve.int4_linear(x[rows // 2 :].contiguous(), *packed))


@needs_prefill_kernel
def test_the_tile_kernel_and_torchs_bf16_gemm_share_threads():
    """Both configure the threads' tiles (torch through oneDNN, e.g. the bf16 head of --dtype int4):
    each must still compute the same after the other ran."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(256, 576, generator=g).bfloat16(), torch.randn(64, 576, generator=g).bfloat16()
    packed = quant.pack_q4(*_weights(64, 576, seed=5))
    rows = torch.randn(40, 576, generator=g)
    gemm, tiles = torch.nn.functional.linear(x, w), torch.ops.phiserve.int4_linear(rows, *packed, 40)
    for _ in range(3):
        assert torch.equal(torch.ops.phiserve.int4_linear(rows, *packed, 40), tiles)
        assert torch.equal(torch.nn.functional.linear(x, w), gemm)


@needs_kernels
def test_without_a_prefill_kernel_prefill_rows_take_the_int16_path():
    if torch.ops.phiserve.has_prefill_kernel():
        pytest.skip("this CPU has the AMX prefill kernel (tested above)")
    q, scale, min_ = _weights(24, 96, seed=4)
    packed = quant.pack_q4(q, scale, min_)
    x = torch.randn(9, 96)
    assert torch.equal(torch.ops.phiserve.int4_linear(x, *packed, 9), torch.ops.phiserve.int4_linear(x, *packed))


@needs_kernels
def test_int4_linear_rejects_bad_prefill_rows():
    q, scale, min_ = _weights(8, 64)
    packed = quant.pack_q4(q, scale, min_)
    for bad in (-1, 3):
        with pytest.raises(RuntimeError, match="prefill_rows"):
            torch.ops.phiserve.int4_linear(torch.randn(2, 64), *packed, bad)


@needs_kernels
def test_int4_linear_rejects_bad_shapes():
    q, scale, min_ = _weights(8, 64)
    qweight, scales, mins = quant.pack_q4(q, scale, min_)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.phiserve.int4_linear(torch.randn(2, 48), qweight[:, :6].contiguous(), scales, mins)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.phiserve.int4_linear(torch.randn(2, 64, dtype=torch.float64), qweight, scales, mins)


@needs_kernels
def test_decode_attention_rejects_a_context_past_its_block_table():
    q = torch.randn(1, 4, 16)
    cache = torch.randn(8, 2, 16)
    with pytest.raises(RuntimeError, match="context length"):
        torch.ops.phiserve.paged_decode_attention(q, cache, cache, torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([9], dtype=torch.int32), 4, 0.25)


def _causal_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Attention in float64 of queries at positions start.. over the keys in `slots`, each query seeing
    the keys up to its own position."""
    n, heads, _ = q.shape
    group = heads // k_cache.shape[1]
    k = k_cache[slots].double().repeat_interleave(group, 1)
    v = v_cache[slots].double().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale
    visible = torch.arange(slots.numel())[None, :] <= (start + torch.arange(n))[:, None]
    return torch.einsum("hnl,lhd->nhd", torch.softmax(scores.masked_fill(~visible, float("-inf")), -1), v)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "start", "heads", "kv_heads", "dim"), [(7, 0, 4, 2, 16), (40, 29, 9, 3, 64), (13, 0, 4, 4, 32), (1, 70, 6, 2, 16)])
def test_prefill_attention_is_causal_attention_and_chunking_keeps_the_bits(cache_dtype, n, start, heads, kv_heads, dim):
    """Every query row against the float64 reference (its own causal limit, keys scattered over the
    cache), and each row bitwise the same when the chunk is split: a prompt's rows must not depend on
    how the scheduler cut it, nor on which rows share a register tile."""
    g = torch.Generator().manual_seed(n + start)
    length = start + n
    k_cache = torch.randn(length + 20, kv_heads, dim, generator=g).to(cache_dtype)
    v_cache = torch.randn(length + 20, kv_heads, dim, generator=g).to(cache_dtype)
    slots = torch.randperm(length + 20, generator=g)[:length]
    q = torch.randn(n, heads, dim, generator=g)
    out = torch.ops.phiserve.prefill_attention(q, k_cache, v_cache, slots, start, 0.125)
    torch.testing.assert_close(out.double(), _causal_reference(q, k_cache, v_cache, slots, start, 0.125), rtol=1e-5, atol=2e-6)
    for cut in sorted({1, n // 2, n - 1} - {0}):  # the same rows as the tail of a later chunk
        tail = torch.ops.phiserve.prefill_attention(q[cut:].contiguous(), k_cache, v_cache, slots, start + cut, 0.125)
        assert torch.equal(tail, out[cut:])
        head = torch.ops.phiserve.prefill_attention(q[:cut].contiguous(), k_cache, v_cache, slots[: start + cut].contiguous(), start, 0.125)
        assert torch.equal(head, out[:cut])


@needs_kernels
def test_prefill_attention_rejects_bad_slots():
    q, cache = torch.randn(3, 4, 16), torch.randn(8, 2, 16)
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.phiserve.prefill_attention(q, cache, cache, torch.tensor([0, 1, 9]), 0, 0.25)
    with pytest.raises(RuntimeError, match="start \\+ n"):
        torch.ops.phiserve.prefill_attention(q, cache, cache, torch.tensor([0, 1, 2]), 1, 0.25)


@needs_kernels
def test_int8_linear_equals_the_dequantized_product_and_q8_0_round_trips():
    g = torch.Generator().manual_seed(2)
    q, scale = quant.quantize_q8(torch.randn(24, 64, generator=g))
    dense = q.double() * scale.double().repeat_interleave(32, 1)
    again_q, again_scale = quant.quantize_q8(dense.float())  # weights dequantized from Q8_0 come back exactly
    assert torch.equal(again_q, q) and torch.equal(again_scale, scale)
    packed = quant.pack_q8(q, scale)
    x = torch.randn(9, 64, generator=g)
    out = torch.ops.phiserve.int8_linear(x, *packed)
    torch.testing.assert_close(out.double(), _kernel_reference(x, q, scale, None), rtol=1e-6, atol=1e-6)
    ref = x.double() @ dense.t()
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    for i in range(9):  # row tiles of 4, 2, 1 give each row the same bits
        assert torch.equal(torch.ops.phiserve.int8_linear(x[i : i + 1].contiguous(), *packed)[0], out[i])


@needs_kernels
def test_rms_norm_kernels_match_torch():
    x, res, w = torch.randn(5, 64), torch.randn(5, 64), torch.randn(64)
    torch.testing.assert_close(torch.ops.phiserve.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (64,), w, 1e-5))
    fused = x.clone()
    out = torch.ops.phiserve.add_rms_norm_(fused, res, w, 1e-5)
    torch.testing.assert_close(fused, x + res)  # the residual add happens in place
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x + res, (64,), w, 1e-5))


@needs_kernels
def test_rope_and_cache_matches_the_torch_path():
    from phiserve.models.decoder import apply_rope

    t, heads, kv_heads, dim = 5, 4, 2, 16
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim)
    angles = torch.randn(t, dim // 2)
    cos, sin = angles.cos(), angles.sin()
    k_cache, v_cache = torch.zeros(12, kv_heads, dim), torch.zeros(12, kv_heads, dim)
    slots = torch.tensor([7, 2, 9, 0, 11])
    q, k, v = torch.ops.phiserve.rope_and_cache(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads)
    rq, rk, rv = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    torch.testing.assert_close(q, apply_rope(rq.view(t, heads, dim), cos[:, None], sin[:, None]))
    torch.testing.assert_close(k, apply_rope(rk.view(t, kv_heads, dim), cos[:, None], sin[:, None]))
    assert torch.equal(v, rv.reshape(t, kv_heads, dim))
    assert torch.equal(k_cache[slots], k) and torch.equal(v_cache[slots], v)
    untouched = torch.tensor([i for i in range(12) if i not in slots.tolist()])
    assert not k_cache[untouched].any() and not v_cache[untouched].any()
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.phiserve.rope_and_cache(qkv, cos, sin, k_cache, v_cache, torch.tensor([0, 1, 2, 3, 12]), heads, kv_heads)
    # a float16 cache holds exactly torch's rounding of k and v (values across float16's range)
    qkv = qkv * torch.logspace(-9, 5, qkv.shape[1])
    half_k, half_v = torch.zeros(12, kv_heads, dim, dtype=torch.float16), torch.zeros(12, kv_heads, dim, dtype=torch.float16)
    _, k, v = torch.ops.phiserve.rope_and_cache(qkv, cos, sin, half_k, half_v, slots, heads, kv_heads)
    assert torch.equal(half_k[slots], k.half()) and torch.equal(half_v[slots], v.half())


@needs_kernels
def test_silu_mul_matches_torch_over_the_whole_range():
    gate = torch.cat([torch.linspace(-100, 100, 37), torch.randn(30) * 4])  # 67: vector part and scalar tail
    gate_up = torch.stack([torch.cat([gate, torch.randn(67)]), torch.cat([gate.flip(0), torch.randn(67)])])
    ref = torch.nn.functional.silu(gate_up[:, :67]) * gate_up[:, 67:]
    torch.testing.assert_close(torch.ops.phiserve.silu_mul(gate_up), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_portable_path_computes_what_the_avx2_path_does(tmp_path):
    """CPUs without AVX2 (ARM laptops) run the scalar code: build it (no -march) under another
    namespace and compare. The weight kernels must give the same bits (same integer dots, same FMA
    chain); the rest the same values up to the vectorized exp's rounding."""
    if not cpu_kernels.available():
        pytest.skip("CPU kernels unavailable here")
    from torch.utils import cpp_extension

    source = cpu_kernels.SOURCE.read_text().replace("TORCH_LIBRARY(phiserve,", "TORCH_LIBRARY(phiserve_portable,")
    source = source.replace("TORCH_LIBRARY_IMPL(phiserve,", "TORCH_LIBRARY_IMPL(phiserve_portable,")
    (tmp_path / "portable.cpp").write_text(source)
    cpp_extension.load(
        name="phiserve_portable_kernels", sources=[str(tmp_path / "portable.cpp")], build_directory=str(tmp_path),
        extra_cflags=["-O2", "-fopenmp", "-mno-avx2", "-mno-fma"], is_python_module=False,
    )
    fast, portable = torch.ops.phiserve, torch.ops.phiserve_portable
    g = torch.Generator().manual_seed(3)
    q, scale, min_ = _weights(40, 96, seed=3)
    x = torch.randn(6, 96, generator=g)
    assert torch.equal(portable.int4_linear(x, *quant.pack_q4(q, scale, min_)), fast.int4_linear(x, *quant.pack_q4(q, scale, min_)))
    q8, s8 = quant.quantize_q8(torch.randn(40, 96, generator=g))
    assert torch.equal(portable.int8_linear(x, *quant.pack_q8(q8, s8)), fast.int8_linear(x, *quant.pack_q8(q8, s8)))
    q4 = quant.pack_q4(q, scale, min_)
    for m in (14, 29):  # the AVX2 path's panel loop: the asm 6-row tile, then a 2- or 5-row tile
        rows = torch.randn(m, 96, generator=g)
        assert torch.equal(portable.int4_linear(rows, *q4), fast.int4_linear(rows, *q4))
        assert torch.equal(portable.int8_linear(rows, *quant.pack_q8(q8, s8)), fast.int8_linear(rows, *quant.pack_q8(q8, s8)))
    gate_up, w = torch.randn(3, 64, generator=g), torch.randn(96, generator=g)
    torch.testing.assert_close(portable.silu_mul(gate_up), fast.silu_mul(gate_up))
    torch.testing.assert_close(portable.rms_norm(x, w, 1e-5), fast.rms_norm(x, w, 1e-5))
    for heads, kv_heads, dim in ((4, 2, 16), (9, 3, 64)):  # head size 64: the register-blocked vector paths
        qd = torch.randn(4, heads, dim, generator=g)  # 4 rows: whole-row tasks on two threads
        cache_k, cache_v = torch.randn(16, kv_heads, dim, generator=g).half(), torch.randn(16, kv_heads, dim, generator=g).half()
        tables = torch.tensor([[0, 1, 2], [3, 2, 0], [1, 0, 0], [2, 3, 1]], dtype=torch.int32)
        lens = torch.tensor([11, 6, 3, 12], dtype=torch.int32)
        torch.testing.assert_close(
            portable.paged_decode_attention(qd, cache_k, cache_v, tables, lens, 4, 0.25),
            fast.paged_decode_attention(qd, cache_k, cache_v, tables, lens, 4, 0.25),
        )
        slots = torch.tensor([5, 3, 0, 9, 12, 1, 7, 2, 15])
        torch.testing.assert_close(
            portable.prefill_attention(qd.repeat(2, 1, 1)[:7], cache_k, cache_v, slots, 2, 0.25),
            fast.prefill_attention(qd.repeat(2, 1, 1)[:7], cache_k, cache_v, slots, 2, 0.25),
        )


def test_decode_layers_gives_the_bits_of_the_layer_by_layer_decoder(tmp_path, monkeypatch):
    """A decode-only step takes one decode_layers call: it must compute exactly what the Python loop
    over the layers computes (logits, residual stream and the K/V it writes), over int4 and int8
    layers, a float16 paged cache and rows with different context lengths."""
    from phiserve.models import decoder as decoder_module
    from phiserve.models.attention import AttentionMetadata, DecodeRows, PrefillSpan
    from phiserve.models.loader import load_model
    from tests.models.tiny_checkpoints import VOCAB, make_llama

    make_llama(tied=False, seed=3).save_pretrained(tmp_path)
    _, model, _ = load_model(str(tmp_path), weight_format="int4")
    _, dense, _ = load_model(str(tmp_path))
    dense.model.layers[1].mlp.down_proj.set_q8()  # one layer of the other kernel format
    model.model.layers[1].mlp.down_proj = dense.model.layers[1].mlp.down_proj
    cfg, block = model.config, 4
    shape = (64, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16)) for _ in range(cfg.num_layers)]
    g = torch.Generator().manual_seed(0)
    lengths, tables = [5, 11, 2], [[0, 1], [2, 3, 4], [5]]  # context lengths including the new token
    with torch.inference_mode():
        for n, table in zip(lengths, tables, strict=True):  # each prompt's first n-1 tokens, layer by layer
            slots = torch.tensor([table[p // block] * block + p % block for p in range(n - 1)])
            meta = AttentionMetadata(slots, prefills=(PrefillSpan(0, n - 1, None),))
            model(torch.randint(0, VOCAB, (n - 1,), generator=g), torch.arange(n - 1), caches, meta)
    padded = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([t[(n - 1) // block] * block + (n - 1) % block for n, t in zip(lengths, tables, strict=True)]),
        decodes=DecodeRows(0, padded, torch.tensor(lengths, dtype=torch.int32), block),
    )
    ids, positions = torch.randint(0, VOCAB, (3,), generator=g), torch.tensor(lengths) - 1

    def step(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        step_caches = [(k.clone(), v.clone()) for k, v in caches]
        original = decoder_module.Decoder._decode_layer_weights
        calls = []

        def weights(self, *args):  # noqa: ANN001, ANN202
            found = original(self, *args) if fused else None
            calls.append(found is not None)
            return found

        monkeypatch.setattr(decoder_module.Decoder, "_decode_layer_weights", weights)
        with torch.inference_mode():
            logits = model(ids, positions, step_caches, meta, torch.arange(3), dense_rows=0)
        assert calls == [fused]
        return logits, [c for pair in step_caches for c in pair]

    fused_logits, fused_caches = step(True)
    loop_logits, loop_caches = step(False)
    assert torch.equal(fused_logits, loop_logits) and fused_logits.isfinite().all()
    assert all(torch.equal(a, b) for a, b in zip(fused_caches, loop_caches, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(fused_caches, [c for pair in caches for c in pair], strict=True))


@needs_kernels
def test_the_last_layer_skips_rows_that_sample_nothing_without_changing_a_bit(tmp_path, monkeypatch):
    """A mixed step (a prompt's last chunk, a chunk that does not finish its prompt, two decodes): the
    last layer runs attention and MLP for the three sampling rows only. Logits and every K/V written
    must be bitwise those of the full layer."""
    from phiserve.models import decoder as decoder_module
    from phiserve.models.attention import AttentionMetadata, DecodeRows, PrefillSpan
    from phiserve.models.loader import load_model
    from tests.models.tiny_checkpoints import VOCAB, make_llama

    make_llama(tied=False, seed=4).save_pretrained(tmp_path)
    _, model, _ = load_model(str(tmp_path), weight_format="int4")
    cfg, block = model.config, 4
    shape = (64, cfg.num_kv_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16)) for _ in range(cfg.num_layers)]
    g = torch.Generator().manual_seed(1)
    lengths, tables = [5, 11], [[0, 1], [2, 3, 4]]  # two decoding sequences, their contexts written first
    with torch.inference_mode():
        for n, table in zip(lengths, tables, strict=True):
            slots = torch.tensor([table[p // block] * block + p % block for p in range(n - 1)])
            model(torch.randint(0, VOCAB, (n - 1,), generator=g), torch.arange(n - 1), caches, AttentionMetadata(slots, prefills=(PrefillSpan(0, n - 1, None),)))
        # a prompt whose first 3 tokens are cached (slots 20-22): this step's chunk is its last 4
        model(torch.randint(0, VOCAB, (3,), generator=g), torch.arange(3), caches, AttentionMetadata(torch.arange(20, 23), prefills=(PrefillSpan(0, 3, None),)))
    decode_slots = [t[(n - 1) // block] * block + (n - 1) % block for n, t in zip(lengths, tables, strict=True)]
    slot_mapping = torch.tensor([23, 24, 25, 26, *range(32, 38), *decode_slots])  # chunk 1, chunk 2 (new, unfinished), decodes
    positions = torch.tensor([3, 4, 5, 6, *range(6), *(n - 1 for n in lengths)])
    meta = AttentionMetadata(
        slot_mapping,
        decodes=DecodeRows(10, torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32), block),
        prefills=(PrefillSpan(0, 4, torch.arange(20, 27)), PrefillSpan(4, 6, None)),
    )
    ids = torch.randint(0, VOCAB, (12,), generator=g)
    logits_rows = torch.tensor([3, 10, 11])

    def step(prune: bool, rows: slice, meta: AttentionMetadata, logits_rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(decoder_module.Decoder, "prune_last_layer", prune)
        step_caches = [(k.clone(), v.clone()) for k, v in caches]
        with torch.inference_mode():
            logits = model(ids[rows], positions[rows], step_caches, meta, logits_rows, dense_rows=10)
        return logits, [c for pair in step_caches for c in pair]

    pruned_calls = []
    original = decoder_module.DecoderLayer.forward_rows
    monkeypatch.setattr(decoder_module.DecoderLayer, "forward_rows", lambda self, *a: pruned_calls.append(1) or original(self, *a))
    # the step above, and the unfinished chunk alone (no row samples: the last layer writes K/V only)
    alone = AttentionMetadata(slot_mapping[4:10], prefills=(PrefillSpan(0, 6, None),))
    for rows, step_meta, sampling in ((slice(0, 12), meta, logits_rows), (slice(4, 10), alone, torch.tensor([], dtype=torch.long))):
        pruned, pruned_caches = step(True, rows, step_meta, sampling)
        full, full_caches = step(False, rows, step_meta, sampling)
        assert pruned.shape == (len(sampling), VOCAB) and pruned.isfinite().all()
        assert torch.equal(pruned, full)
        assert all(torch.equal(a, b) for a, b in zip(pruned_caches, full_caches, strict=True))
    assert pruned_calls == [1, 1]


def test_metadata_for_the_sampling_rows_keeps_their_positions():
    from phiserve.models.attention import AttentionMetadata, DecodeRows, PrefillSpan

    decodes = DecodeRows(9, torch.zeros(2, 3, dtype=torch.int32), torch.tensor([5, 7], dtype=torch.int32), 4)
    meta = AttentionMetadata(torch.arange(100, 111), decodes, (PrefillSpan(0, 4, torch.arange(50, 54)), PrefillSpan(4, 5, None)))
    rows = meta.for_rows([3, 7, 8, 9, 10])
    assert rows is not None and rows.slot_mapping.tolist() == [103, 107, 108, 109, 110]
    first, second = rows.prefills
    assert (first.start, first.length, first.context_slots.tolist()) == (0, 1, [50, 51, 52, 53])
    assert (second.start, second.length, second.context_slots.tolist()) == (1, 2, [104, 105, 106, 107, 108])
    assert rows.decodes is not None and rows.decodes.start == 3 and rows.decodes.context_lens.tolist() == [5, 7]
    assert meta.for_rows([2, 8, 9, 10]) is None  # not a suffix of the first chunk
    assert meta.for_rows([3, 8, 10]) is None  # a decode row left out


@needs_kernels
def test_a_prompt_gives_the_same_logits_in_one_chunk_or_over_a_cached_prefix(tmp_path):
    """The engine prefills long prompts in chunks and answers repeated prefixes from the cache: the
    prompt's last logits must be bitwise those of one cold pass (int4 linears, float16 paged cache)."""
    from phiserve.models.attention import AttentionMetadata, PrefillSpan
    from phiserve.models.loader import load_model
    from tests.models.tiny_checkpoints import VOCAB, make_llama

    make_llama(tied=False, seed=5).save_pretrained(tmp_path)
    _, model, _ = load_model(str(tmp_path), weight_format="int4")
    cfg = model.config
    ids = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(2))
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(3))[:23]

    def prefill(cuts: list[int]) -> torch.Tensor:
        shape = (64, cfg.num_kv_heads, cfg.head_dim)
        caches = [(torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16)) for _ in range(cfg.num_layers)]
        bounds = [0, *cuts, len(ids)]
        with torch.inference_mode():
            for a, b in itertools.pairwise(bounds):
                context = None if a == 0 else slots[:b]
                meta = AttentionMetadata(slots[a:b], prefills=(PrefillSpan(0, b - a, context),))
                logits = model(ids[a:b], torch.arange(a, b), caches, meta, torch.tensor([b - a - 1]))
        return logits

    whole = prefill([])
    assert whole.isfinite().all()
    for cuts in ([16], [7, 8], [5, 17, 21]):
        assert torch.equal(prefill(cuts), whole), cuts


@needs_kernels
@pytest.mark.parametrize("k", [1, 64, 1024])
def test_top_k_indices_match_torch_topk(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(5, 49152, generator=g)
    x[1, 1000:1200] = 9.0  # a plateau at the top: the kept values still match
    x[2] = torch.arange(49152.0)  # ascending: every scanned value enters the selection
    x[3, ::7] = float("-inf")  # banned tokens
    got = torch.ops.phiserve.top_k_indices(x, k)
    want_values, want_ids = x.topk(k, dim=-1)
    assert got.shape == (5, k) and got.dtype == torch.long
    assert torch.equal(x.gather(1, got), want_values)  # the same values, largest first
    for row in (0, 2, 3, 4):  # no ties: the same tokens
        assert torch.equal(got[row], want_ids[row])
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.phiserve.top_k_indices(x, 49153)


@needs_kernels
def test_rows_dot_recomputes_the_candidates_exactly_and_per_row():
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(5, 576, generator=g), torch.randn(1000, 576, generator=g)
    idx = torch.randint(0, 1000, (5, 64), generator=g)
    out = torch.ops.phiserve.rows_dot(x, w, idx)
    reference = (x.double()[:, None, :] * w.double()[idx]).sum(-1)
    assert torch.allclose(out.double(), reference, rtol=1e-5, atol=1e-4)
    for r in range(5):  # a row's values do not depend on the other rows
        assert torch.equal(torch.ops.phiserve.rows_dot(x[r : r + 1], w, idx[r : r + 1]), out[r : r + 1])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.phiserve.rows_dot(x, w, torch.full((5, 2), 1000))
