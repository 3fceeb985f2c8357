"""Tiny random Llama/Phi3 checkpoints (transformers) and GGUF copies of them, for loader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 128, 64, 96, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA = 5000.0  # not the default, so a config reader that misses it fails the logits check
EPS = 1e-5


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # transformers' init (std 0.02, unit norms) gives near-zero logits that would hide layout bugs.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


# Llama 3.x rope scaling, sized so the tiny head (8 frequencies) has kept, blended and slowed bands.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def llama3_rope_divisors() -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for LLAMA3_ROPE: per-frequency divisors."""
    s = LLAMA3_ROPE
    inv_freq = 1.0 / ROPE_THETA ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    wavelen = 2 * np.pi / inv_freq
    old_ctx, low, high, factor = (
        s["original_max_position_embeddings"],
        s["low_freq_factor"],
        s["high_freq_factor"],
        s["factor"],
    )
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, blended))
    return out.astype(np.float32)


def make_llama(tied: bool, seed: int = 0, llama3_rope: bool = False) -> LlamaForCausalLM:
    rope = {"rope_parameters": {"rope_theta": ROPE_THETA, **LLAMA3_ROPE}} if llama3_rope else {}
    cfg = LlamaConfig(
        **rope,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rope_theta=ROPE_THETA,
        rms_norm_eps=EPS,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model, seed)
    if tied:
        model.tie_weights()
    return model


def make_phi3(seed: int = 0) -> Phi3ForCausalLM:
    cfg = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rope_theta=ROPE_THETA,
        rms_norm_eps=EPS,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(cfg).eval()
    _randomize(model, seed)
    return model


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (half-split rope -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(writer: GGUFWriter, name: str, w: np.ndarray, qtype: GGMLQuantizationType) -> None:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 1 or qtype == GGMLQuantizationType.F32:
        writer.add_tensor(name, w)
    else:
        writer.add_tensor(name, quantize(w, qtype), raw_dtype=qtype)  # shape from the byte array


def write_gguf(
    model: torch.nn.Module,
    path: Path,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    rope_freqs: np.ndarray | None = None,
) -> Path:
    """Convert a tiny Llama or Phi3 model to GGUF the way convert_hf_to_gguf lays it out."""
    cfg = model.config
    arch = "phi3" if cfg.model_type == "phi3" else "llama"
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    _add(writer, "token_embd.weight", sd["model.embed_tokens.weight"], qtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        _add(writer, f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], qtype)
        _add(writer, f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], qtype)
        _add(writer, f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], qtype)
        _add(writer, f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], qtype)
        if arch == "phi3":  # fused tensors go in unchanged (no rope permutation for phi3)
            _add(writer, f"blk.{i}.attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"], qtype)
            _add(writer, f"blk.{i}.ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"], qtype)
        else:
            q = hf_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
            k = hf_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
            _add(writer, f"blk.{i}.attn_q.weight", q, qtype)
            _add(writer, f"blk.{i}.attn_k.weight", k, qtype)
            _add(writer, f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], qtype)
            _add(writer, f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], qtype)
            _add(writer, f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], qtype)
    _add(writer, "output_norm.weight", sd["model.norm.weight"], qtype)
    if not cfg.tie_word_embeddings:
        _add(writer, "output.weight", sd["lm_head.weight"], qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
