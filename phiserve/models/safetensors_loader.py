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
from huggingface_hub.utils import tqdm as hf_tqdm
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


def iter_safetensors_weights(
    folder: str | os.PathLike[str],
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Decoder name, tensor) pairs, shard by shard, each already in ``dtype`` on ``device``.

    Phi3's fused ``qkv_proj``/``gate_up_proj`` pass through as they are (the Decoder holds them fused;
    ``loader.load_weights`` fuses Llama's separate tensors). With tied embeddings and no ``lm_head.weight`` in the checkpoint, ``lm_head.weight`` is yielded last as the
    very same tensor as the embedding, so the two share memory.
    """
    embed: torch.Tensor | None = None
    has_lm_head = False
    files = safetensors_files(folder)
    # A shard-by-shard bar on stderr: a 29 GB Phi-4 takes minutes. huggingface_hub's tqdm honours
    # HF_HUB_DISABLE_PROGRESS_BARS.
    with hf_tqdm(total=len(files), desc="Loading safetensors shards", unit="shard") as progress:
        for path in files:
            progress.set_postfix_str(path.name, refresh=False)
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # old checkpoints store the rope buffer; the Decoder computes its own
                    tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                    if name == "model.embed_tokens.weight":
                        embed = tensor
                    has_lm_head |= name == "lm_head.weight"
                    yield name, tensor
            progress.update(1)
    if cfg.tie_word_embeddings and not has_lm_head and embed is not None:
        yield "lm_head.weight", embed
