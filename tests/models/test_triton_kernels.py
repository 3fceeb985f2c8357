"""Our CUDA kernels (Triton): on the GPU where there is one, else in Triton's CPU interpreter (the
same kernel source, run op by op in NumPy). Decode attention against float64 attention, rope + cache
write, add + RMSNorm and SiLU-and-multiply against the torch expressions they replace."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    """The kernel, compiled for the GPU where there is one, else interpreted (tests/conftest.py)."""
    return importlib.import_module("phiserve.models.triton_kernels")


def reference(q, k_cache, v_cache, tables, lengths, block_size, scale) -> torch.Tensor:
    """float64 attention of each row over its context, slot by slot through its block table."""
    out = []
    group = q.shape[1] // k_cache.shape[1]
    for row, n in enumerate(lengths):
        pos = torch.arange(n)
        slots = tables[row, pos // block_size].long().cpu() * block_size + pos % block_size
        k = k_cache.cpu().double()[slots].repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_cache.cpu().double()[slots].repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[row].cpu().double(), k) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", probs, v))
    return torch.stack(out)


def make_case(heads: int, kv_heads: int, dim: int, block_size: int, lengths: list[int], dtype: torch.dtype, seed: int = 0):
    """Caches with a few blocks to spare; each row's blocks drawn at random (shuffled, never shared),
    tables padded with zeros to the widest row."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 4
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // block_size) for n in lengths)
    tables = []
    for n in lengths:
        blocks = [perm.pop() for _ in range(-(-n // block_size))]
        tables.append(blocks + [0] * (width - len(blocks)))
    q = torch.randn(len(lengths), heads, dim, generator=g).to(dtype)
    to = {"device": DEVICE}
    return (
        q.to(**to), k_cache.to(**to), v_cache.to(**to),
        torch.tensor(tables, dtype=torch.int32, device=DEVICE), torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
    )  # fmt: skip


CASES = {
    # GQA 4:1, head dim 64; lengths on both sides of the kernel's 64-token step, one split in eight
    # ranges of 128
    "gqa4": (8, 2, 64, 4, [1, 5, 63, 64, 65, 130, 1000]),
    # 3 query heads per KV head and head dim 48: both padded inside the kernel
    "padded": (9, 3, 48, 16, [17, 64, 100]),
    # Phi-4's shape: 40 heads over 10 KV heads, head dim 128
    "phi4": (40, 10, 128, 16, [3, 129]),
}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])  # NumPy, under the interpreter, has no bfloat16
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_attention(kernels, case, dtype) -> None:
    heads, kv_heads, dim, block_size, lengths = CASES[case]
    q, k, v, tables, lens = make_case(heads, kv_heads, dim, block_size, lengths, dtype)
    scale = dim**-0.5
    got = kernels.paged_decode_attention(q, k, v, tables, lens, block_size, scale)
    assert got.dtype == dtype and got.shape == q.shape
    want = reference(q, k, v, tables, lengths, block_size, scale)
    torch.testing.assert_close(got.cpu().double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_a_row_gives_the_same_bits_alone_or_batched(kernels) -> None:
    heads, kv_heads, dim, block_size, lengths = CASES["gqa4"]
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v, tables, lens = make_case(heads, kv_heads, dim, block_size, lengths, dtype, seed=1)
    batched = kernels.paged_decode_attention(q, k, v, tables, lens, block_size, 0.125)
    for row in range(len(lengths)):
        alone = kernels.paged_decode_attention(q[row : row + 1], k, v, tables[row : row + 1], lens[row : row + 1], block_size, 0.125)
        assert torch.equal(alone[0], batched[row]), row


def test_rejects_caches_that_do_not_fit(kernels) -> None:
    q, k, v, tables, lens = make_case(8, 3, 64, 4, [5], torch.float32)  # 8 heads over 3 KV heads
    with pytest.raises(ValueError, match="does not fit"):
        kernels.paged_decode_attention(q, k, v, tables, lens, 4, 0.125)


ROPE_CASES = {"d64": (4, 2, 64), "d48": (3, 1, 48), "phi4": (40, 10, 128)}


@pytest.mark.parametrize("case", ROPE_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_and_cache_matches_the_torch_expression(kernels, case, dtype) -> None:
    from phiserve.models.decoder import apply_rope

    heads, kv_heads, dim = ROPE_CASES[case]
    tokens, slots_total = 7, 40
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    angles = torch.randint(0, 5000, (tokens, 1), generator=g) * torch.rand(dim // 2, generator=g)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(slots_total, generator=g)[:tokens]
    sentinel = torch.full((slots_total, kv_heads, dim), 7.0, dtype=dtype)
    k_cache, v_cache = sentinel.clone().to(DEVICE), sentinel.clone().to(DEVICE)

    q, k, v = kernels.rope_and_cache(
        qkv.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), k_cache, v_cache, slots.to(DEVICE), heads, kv_heads
    )
    split = qkv.float().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    want_q = apply_rope(split[0].view(tokens, heads, dim), cos.float()[:, None], sin.float()[:, None])
    want_k = apply_rope(split[1].view(tokens, kv_heads, dim), cos.float()[:, None], sin.float()[:, None])
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(q.cpu().float(), want_q, atol=tol, rtol=tol)  # computed in fp32, rounded once
    torch.testing.assert_close(k.cpu().float(), want_k, atol=tol, rtol=tol)
    assert torch.equal(v.cpu(), qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim))
    assert torch.equal(k_cache[slots].cpu(), k.cpu()) and torch.equal(v_cache[slots].cpu(), v.cpu())
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(k_cache.cpu()[untouched], sentinel[untouched]) and torch.equal(v_cache.cpu()[untouched], sentinel[untouched])


NORM_WIDTHS = {"smollm2": 576, "phi4": 5120, "odd": 100}


@pytest.mark.parametrize("width", NORM_WIDTHS.values(), ids=NORM_WIDTHS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_matches_the_torch_expression(kernels, width, dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(5, width, generator=g).to(dtype) for _ in range(2))
    weight = (1 + torch.randn(width, generator=g) / 4).to(dtype)
    eps = 1e-5
    want_sum = (x.float() + residual.float()).to(dtype)  # the stream is held in its dtype
    want = torch.nn.functional.rms_norm(want_sum.double(), (width,), weight.double(), eps)
    x_dev = x.to(DEVICE)
    out = kernels.add_rms_norm(x_dev, weight.to(DEVICE), eps, residual.to(DEVICE))
    assert torch.equal(x_dev.cpu(), want_sum), "x += residual in place"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)
    plain = kernels.add_rms_norm(x_dev, weight.to(DEVICE), eps)  # no residual: x is left as it is
    assert torch.equal(x_dev.cpu(), want_sum)
    torch.testing.assert_close(plain.cpu(), out.cpu(), atol=0, rtol=0)


def test_add_rms_norm_reads_strided_rows(kernels) -> None:
    """A view of every other row (as a step's sampling rows can be) and an empty batch."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, generator=g)
    weight = torch.rand(64, generator=g) + 0.5
    out = kernels.add_rms_norm(x[::2].to(DEVICE), weight.to(DEVICE), 1e-6)
    want = torch.nn.functional.rms_norm(x[::2].double(), (64,), weight.double(), 1e-6)
    torch.testing.assert_close(out.cpu().double(), want, atol=1e-5, rtol=1e-5)
    assert kernels.add_rms_norm(torch.empty(0, 64, device=DEVICE), weight.to(DEVICE), 1e-6).shape == (0, 64)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.add_rms_norm(x.t().to(DEVICE), weight.to(DEVICE), 1e-6)


@pytest.mark.parametrize("width", [1536, 17920, 100], ids=["smollm2", "phi4", "odd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_matches_the_torch_expression(kernels, width, dtype) -> None:
    g = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(3, 2 * width, generator=g) * 4).to(dtype)
    gate, up = gate_up.double().chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    out = kernels.silu_mul(gate_up.to(DEVICE))
    assert out.shape == (3, width) and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.cpu().double(), want, atol=tol, rtol=tol)
