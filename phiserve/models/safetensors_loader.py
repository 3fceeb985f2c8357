"""Load a local Hugging Face model folder: config.json and (sharded) safetensors, in Decoder naming.

Shards are memory-mapped and read one tensor at a time, each converted straight to the target dtype and
device, so host memory peaks near one tensor plus whatever the OS keeps of the mapped shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from phiserve.models.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


def normalize_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fold transformers>=5's ``rope_parameters`` back into the flat keys ``ModelConfig.from_hf`` reads.

    transformers 5 writes ``{"rope_parameters": {"rope_theta": ..., "rope_type": ...}}`` instead of
    top-level ``rope_theta``/``rope_scaling``; without this, such a checkpoint would silently get the
    default theta. Older configs pass through unchanged.
    """
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or not ({"rope_theta", "rope_type"} & rope.keys()):
        return cfg  # absent, or per-layer-type parameters (not used by Llama/Phi3)
    out = dict(cfg)
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    if "partial_rotary_factor" in rope:
        out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
    if out.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {
            k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")
        }
    return out


def read_hf_config(folder: str | os.PathLike[str]) -> ModelConfig:
    """ModelConfig from ``folder/config.json``."""
    with open(Path(folder) / "config.json", encoding="utf-8") as f:
        return ModelConfig.from_hf(normalize_hf_config(json.load(f)))


def safetensors_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint's shard files, in order: from the index when sharded, else the single file."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        with open(index, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]  # ignore e.g. Mistral's duplicate consolidated.safetensors
    else:
        files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing checkpoint shard(s): {', '.join(missing)}")
    return files


def _fused_splits(name: str, cfg: ModelConfig) -> list[tuple[str, int, int]] | None:
    """Row ranges of Phi3's fused tensors as (Decoder name, start, stop); None for ordinary tensors."""
    if name.endswith("self_attn.qkv_proj.weight"):
        base = name.removesuffix("qkv_proj.weight")
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [
            (base + "q_proj.weight", 0, q),
            (base + "k_proj.weight", q, q + kv),
            (base + "v_proj.weight", q + kv, q + 2 * kv),
        ]
    if name.endswith("mlp.gate_up_proj.weight"):  # HF Phi3MLP: gate, up = chunk(2); gate first
        base = name.removesuffix("gate_up_proj.weight")
        n = cfg.intermediate_size
        return [(base + "gate_proj.weight", 0, n), (base + "up_proj.weight", n, 2 * n)]
    return None


def iter_safetensors_weights(
    folder: str | os.PathLike[str],
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Decoder name, tensor) pairs, shard by shard, each already in ``dtype`` on ``device``.

    Phi3's fused ``qkv_proj``/``gate_up_proj`` are split (reading only each piece's rows). With tied
    embeddings and no ``lm_head.weight`` in the checkpoint, ``lm_head.weight`` is yielded last as the
    very same tensor as the embedding, so the two share memory.
    """
    embed: torch.Tensor | None = None
    has_lm_head = False
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # old checkpoints store the rope buffer; the Decoder computes its own
                splits = _fused_splits(name, cfg)
                if splits is not None:
                    sl = f.get_slice(name)
                    rows = sl.get_shape()[0]
                    if rows != splits[-1][2]:
                        raise ValueError(f"{name}: {rows} rows, expected {splits[-1][2]} from config.json")
                    for sub, a, b in splits:
                        yield sub, sl[a:b].to(device=device, dtype=dtype)
                    continue
                tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                if name == "model.embed_tokens.weight":
                    embed = tensor
                has_lm_head |= name == "lm_head.weight"
                yield name, tensor
    if cfg.tie_word_embeddings and not has_lm_head and embed is not None:
        yield "lm_head.weight", embed
