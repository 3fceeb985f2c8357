"""One decoder for the Llama/Phi3 family, in plain PyTorch, readable top to bottom.

Parameter names follow Hugging Face's layout (``model.layers.N.self_attn.qkv_proj.weight``...), with
q/k/v and gate/up fused as in Phi-3; loaders fuse Llama's separate tensors and translate GGUF names.
Inputs are flattened: one row per token of every sequence in the batch (see ``attention.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from phiserve.models import cpu_kernels
from phiserve.models.attention import AttentionMetadata, paged_attention, write_kv
from phiserve.models.config import ModelConfig
from phiserve.models.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, graph: bool = False) -> torch.Tensor:
        """norm(x); with ``residual``, first ``x += residual`` in place (the residual add fused in).
        ``graph``: the pass is for a CUDA graph (see Decoder.forward)."""
        if x.dim() == 2 and cpu_kernels.usable(x):
            if residual is None:
                return torch.ops.phiserve.rms_norm(x, self.weight, self.eps)
            return torch.ops.phiserve.add_rms_norm_(x, residual.contiguous(), self.weight, self.eps)
        if graph and x.dim() == 2 and x.is_cuda:
            from phiserve.models import triton_kernels  # one launch for the add and the norm

            return triton_kernels.add_rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x.add_(residual)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.x: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor, torch.where(wavelen < old_ctx / high, inv_freq, blended))
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, 1, D/2]. Rotates the two halves (Hugging Face / NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# Checkpoints store q/k/v and gate/up separately (Llama) or fused (Phi-3); the decoder always holds
# them fused, so each layer runs two matmuls fewer. Loaders concatenate the parts in this order.
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fused_target(name: str) -> tuple[str, int, int] | None:
    """For a separate checkpoint tensor name, (fused parameter name, part index, number of parts)."""
    for fused, parts in FUSED_PARTS.items():
        for i, part in enumerate(parts):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                return f"{name.removesuffix(suffix)}.{fused}.weight", i, len(parts)
    return None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.scale = cfg.head_dim**-0.5

    # Two halves instead of forward(): the last layer projects every row but attends for some (DecoderLayer.forward_rows).
    def project(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        meta: AttentionMetadata | None,
        dense_rows: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, D], k and v [T, KVH, D], rotated; k and v written to the cache."""
        T = x.shape[0]
        qkv = self.qkv_proj(x, dense_rows)
        k_cache, v_cache = kv_cache if kv_cache is not None else (None, None)
        fused = None  # one op that rotates q and k, splits out v and writes k and v into the paged cache
        if k_cache is not None and meta is not None:
            if cpu_kernels.usable(qkv, cos, kv_cache=k_cache):
                fused = torch.ops.phiserve.rope_and_cache
            elif qkv.is_cuda:
                from phiserve.models import triton_kernels  # the same op on CUDA, in Triton

                fused = triton_kernels.rope_and_cache
        if fused is not None:
            q, k, v = fused(qkv, cos.view(T, -1), sin.view(T, -1), k_cache, v_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(q.view(T, self.num_heads, self.head_dim), cos, sin)
            k = apply_rope(k.view(T, self.num_kv_heads, self.head_dim), cos, sin)
            v = v.view(T, self.num_kv_heads, self.head_dim)
            if k_cache is not None and meta is not None:
                write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        meta: AttentionMetadata | None,
        dense_rows: int | None,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache if kv_cache is not None else (None, None)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(q.shape[0], self.num_heads * self.head_dim), dense_rows)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, dense_rows: int | None, graph: bool = False) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, dense_rows)
        if gate_up.dim() == 2 and cpu_kernels.usable(gate_up):
            return self.down_proj(torch.ops.phiserve.silu_mul(gate_up), dense_rows)
        if graph and gate_up.dim() == 2 and gate_up.is_cuda:
            from phiserve.models import triton_kernels

            return self.down_proj(triton_kernels.silu_mul(gate_up), dense_rows)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, dense_rows)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, delta, cos, sin, kv_cache, meta, dense_rows, graph=False):  # noqa: ANN001, ANN201 - hot path, types as in Decoder
        """x: the residual stream, updated in place; delta: the previous layer's output, not yet added
        (None for the first layer). Returns this layer's output, which the next norm adds."""
        h = self.input_layernorm(x, delta, graph)
        q, k, v = self.self_attn.project(h, cos, sin, kv_cache, meta, dense_rows)
        h = self.post_attention_layernorm(x, self.self_attn.attend(q, k, v, kv_cache, meta, dense_rows), graph)
        return self.mlp(h, dense_rows, graph)

    def forward_rows(self, x, delta, cos, sin, kv_cache, meta, dense_rows, rows, rows_meta, rows_dense):  # noqa: ANN001, ANN201
        """The last layer when only ``rows`` (a tensor; ``rows_meta``: their metadata) feed the logits:
        every row's K and V, the rest of the layer for those rows only. Returns their residual stream
        and this layer's output. Each row's arithmetic is forward()'s, so their bits are too."""
        h = self.input_layernorm(x, delta)
        q, k, v = self.self_attn.project(h, cos, sin, kv_cache, meta, dense_rows)
        x = x[rows]
        o = self.self_attn.attend(q[rows], k[rows], v[rows], kv_cache, rows_meta, rows_dense)
        return x, self.mlp(self.post_attention_layernorm(x, o), rows_dense)


class DecoderBody(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Parameters are left uninitialised (torch.empty, as in Linear): checkpoints provide them, and
        # untouched pages cost no memory. (Building on the meta device instead imports torch._dynamo
        # through torch's reference ops: 3 s of server start-up.)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Decoder(nn.Module):
    prune_last_layer = True  # the last layer skips rows that feed no logits (see _logits_rows_meta); tests compare both

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self._fused_weights: tuple[list[torch.Tensor], bool] | None = None  # see _decode_layer_weights

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        meta: AttentionMetadata | None = None,
        logits_rows: torch.Tensor | None = None,
        dense_rows: int | None = None,
        graph: bool = False,
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns fp32 logits [len(logits_rows) or T, vocab].

        ``dense_rows``: the leading rows (prefill chunks) that take the linears' dense weights where
        a layer keeps them; the rest (decodes) the packed kernels (ours take all rows in one call:
        see ``Linear.forward``). None: all rows are prefill rows.

        ``graph``: this pass is captured into a CUDA graph (or warms one up). Only then do the add +
        RMSNorm and SiLU-and-multiply take our Triton kernels: a Triton launch costs the host more than
        torch's, eager steps of 16+ rows are bound by the host's launches, and a replay launches
        nothing (H200, Phi-4's shape: replay 8.75 -> 8.16 ms at one row; eager with them, 15.0 -> 18.2
        ms a step at 64 rows).
        """
        if dense_rows is None:
            dense_rows = input_ids.shape[0]
        x = self.model.embed_tokens(input_ids)  # a fresh tensor: layers add to it in place
        freqs = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        cos = freqs.cos().to(x.dtype).unsqueeze(1)
        sin = freqs.sin().to(x.dtype).unsqueeze(1)
        weights = self._decode_layer_weights(x, kv_caches, meta, dense_rows)
        rows_meta = None
        if weights is not None:
            # A decode-only step: every layer in one call of our kernels (same kernels, same order,
            # same bits as the loop below, without ~10 Python calls per layer).
            T, cfg, dec = x.shape[0], self.config, meta.decodes
            delta = torch.ops.phiserve.decode_layers(
                x, cos.view(T, -1), sin.view(T, -1), [k for k, _ in kv_caches], [v for _, v in kv_caches], meta.slot_mapping,
                dec.block_tables, dec.context_lens, dec.block_size, weights, cfg.num_heads, cfg.num_kv_heads,
                cfg.rms_norm_eps, self.model.layers[0].self_attn.scale,
            )
        else:
            delta, layers = None, self.model.layers
            rows_meta = self._logits_rows_meta(x, kv_caches, meta, logits_rows)
            # With rows_meta the last layer runs below, for the sampling rows only.
            for i, layer in enumerate(layers if rows_meta is None else layers[:-1]):
                delta = layer(x, delta, cos, sin, kv_caches[i] if kv_caches is not None else None, meta, dense_rows, graph)
        if logits_rows is not None:
            rows_dense = int((logits_rows < dense_rows).sum())
            if rows_meta is not None:
                # Rows that feed no logits (a prefill chunk's all but last) need only the last layer's
                # K and V (512-token prefill steps: 1.01-1.03x, as much as this VM's noise shows).
                x, delta = self.model.layers[-1].forward_rows(
                    x, delta, cos, sin, kv_caches[-1], meta, dense_rows, logits_rows, rows_meta, rows_dense
                )
            else:
                x, delta = x[logits_rows], delta[logits_rows] if delta is not None else None
            dense_rows = rows_dense
        return self.lm_head(self.model.norm(x, delta, graph), dense_rows).float()

    def _logits_rows_meta(
        self, x: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None, meta: AttentionMetadata | None,
        logits_rows: torch.Tensor | None,
    ) -> AttentionMetadata | None:
        """The metadata of ``logits_rows`` alone when the last layer can skip the other rows: a step
        with rows that sample nothing, on our CPU kernels, whose results are per row (a row's bits do
        not depend on which rows run beside it, tested), so skipping changes no logit."""
        if not self.prune_last_layer or meta is None or kv_caches is None or logits_rows is None:
            return None
        if logits_rows.numel() == x.shape[0] or not cpu_kernels.usable(x, kv_cache=kv_caches[-1][0]):
            return None
        return meta.for_rows(logits_rows.tolist())

    def _decode_layer_weights(
        self, x: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None, meta: AttentionMetadata | None, dense_rows: int
    ) -> list[torch.Tensor] | None:
        """The per-layer tensors of ``torch.ops.phiserve.decode_layers`` when this step can take it:
        decode rows only, every layer's linears in our kernels' formats (and not held dense for these
        rows), float32 activations and a cache our attention kernel reads. Otherwise None."""
        if meta is None or kv_caches is None or meta.decodes is None or meta.decodes.start != 0:
            return None
        if not cpu_kernels.usable(x, kv_cache=kv_caches[0][0]):
            return None
        if self._fused_weights is None:  # weights are fixed once loaded: collect them once
            self._fused_weights = self._collect_decode_layer_weights()
        weights, any_dense = self._fused_weights
        return weights if weights and not (any_dense and dense_rows) else None

    def _collect_decode_layer_weights(self) -> tuple[list[torch.Tensor], bool]:
        weights: list[torch.Tensor] = []
        any_dense = False
        no_mins = torch.empty(0, dtype=torch.float16)  # decode_layers' mark of a group-32 int8 layer
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(n.dtype != torch.float32 for n in norms) or not all(lin.in_our_format for lin in linears):
                return [], False
            any_dense = any_dense or any(lin.has_dense for lin in linears)
            packed = [[lin.packed, lin.scales, no_mins if lin.mins is None else lin.mins] for lin in linears]
            weights += [norms[0].detach(), *packed[0], *packed[1], norms[1].detach(), *packed[2], *packed[3]]
        return weights, any_dense
