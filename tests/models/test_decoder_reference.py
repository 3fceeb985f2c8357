"""Our Decoder, loaded from Hugging Face safetensors, must reproduce transformers' logits."""

from __future__ import annotations

import json

import pytest
import torch

from phiserve.models.config import ModelConfig
from phiserve.models.decoder import Decoder
from phiserve.models.loader import (
    ModelNotFoundError,
    WeightLoadError,
    load_model,
    load_weights,
    resolve_model,
)
from phiserve.models.safetensors_loader import iter_safetensors_weights, read_hf_config, safetensors_files
from tests.models.tiny_checkpoints import ROPE_THETA, VOCAB, hf_logits, make_llama, make_phi3

IDS = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1))


def _ours(folder, dtype=torch.float32) -> torch.Tensor:
    _, decoder, resolved = load_model(str(folder), dtype=dtype)
    assert resolved.kind == "hf"
    with torch.no_grad():
        return decoder(IDS, torch.arange(len(IDS)))


@pytest.mark.parametrize(
    ("arch", "tied", "sharded"),
    [
        ("llama", False, False),
        ("llama", True, False),
        ("llama", False, True),
        ("phi3", False, False),
        ("phi3", False, True),
    ],
)
def test_safetensors_matches_transformers(tmp_path, arch, tied, sharded) -> None:
    model = make_llama(tied) if arch == "llama" else make_phi3()
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    assert len(safetensors_files(tmp_path)) > 1 if sharded else len(safetensors_files(tmp_path)) == 1
    cfg = read_hf_config(tmp_path)
    assert (cfg.architecture, cfg.tie_word_embeddings, cfg.rope_theta) == (arch, tied, ROPE_THETA)
    torch.testing.assert_close(_ours(tmp_path), hf_logits(model, IDS), atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_from_rope_parameters(tmp_path) -> None:
    model = make_llama(tied=False, llama3_rope=True)
    model.save_pretrained(tmp_path)
    cfg = read_hf_config(tmp_path)
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, VOCAB, (120,), generator=torch.Generator().manual_seed(3))  # past the 64 context
    _, decoder, _ = load_model(str(tmp_path))
    with torch.no_grad():
        ours = decoder(ids, torch.arange(len(ids)))
    torch.testing.assert_close(ours, hf_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_tied_embedding_shares_memory(tmp_path) -> None:
    make_llama(tied=True).save_pretrained(tmp_path)
    _, decoder, _ = load_model(str(tmp_path))
    assert decoder.lm_head.weight.data_ptr() == decoder.model.embed_tokens.weight.data_ptr()
    assert not any(p.is_meta for p in decoder.parameters()) and not decoder.inv_freq.is_meta


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_bf16_load_close_to_fp32_reference(tmp_path, arch) -> None:
    model = make_llama(tied=False) if arch == "llama" else make_phi3()
    model.save_pretrained(tmp_path)
    ours = _ours(tmp_path, torch.bfloat16)
    ref = hf_logits(model, IDS)
    assert ours.dtype == torch.float32  # logits always come back fp32
    # bf16 keeps ~3 significant digits: a few bf16 ulps per logit, against an exact-weights reference.
    assert (ours - ref).norm() <= 3e-2 * ref.norm()  # measured ~1.2-1.5e-2 here
    assert (ours - ref).abs().max() <= 5e-2 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_bf16_checkpoint_loads_as_fp32(tmp_path) -> None:
    model = make_llama(tied=False)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    _, decoder, _ = load_model(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in decoder.parameters())
    q_rows = model.model.layers[0].self_attn.q_proj.weight.shape[0]
    torch.testing.assert_close(
        decoder.model.layers[0].self_attn.qkv_proj.weight[:q_rows], model.model.layers[0].self_attn.q_proj.weight.float()
    )


def test_transformers4_style_config(tmp_path) -> None:
    # Older configs keep rope_theta/rope_scaling at top level; both spellings must agree.
    make_llama(tied=False).save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw.pop("rope_parameters")
    raw["rope_theta"] = ROPE_THETA
    cfg_file.write_text(json.dumps(raw))
    assert read_hf_config(tmp_path).rope_theta == ROPE_THETA


def _tiny_cfg() -> ModelConfig:
    return ModelConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=12,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
    )


def _tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {name: torch.randn(p.shape) for name, p in Decoder(cfg).named_parameters()}


def test_load_weights_checks_names_and_shapes() -> None:
    cfg = _tiny_cfg()
    good = _tensors(cfg)

    def load(items) -> None:
        with torch.device("meta"):
            decoder = Decoder(cfg)
        load_weights(decoder, items)

    load(good.items())
    with pytest.raises(WeightLoadError, match="lacks 1 tensor.*lm_head.weight"):
        load((k, v) for k, v in good.items() if k != "lm_head.weight")
    with pytest.raises(WeightLoadError, match="shape"):
        load({**good, "model.norm.weight": torch.ones(3)}.items())
    with pytest.raises(WeightLoadError, match="no matching"):
        load([*good.items(), ("model.layers.0.self_attn.q_proj.bias", torch.zeros(8))])
    with pytest.raises(WeightLoadError, match="more than once"):
        load([*good.items(), ("model.norm.weight", torch.ones(8))])


def test_iter_safetensors_keeps_phi3_fused(tmp_path) -> None:
    model = make_phi3()
    model.save_pretrained(tmp_path)
    names = dict(iter_safetensors_weights(tmp_path, read_hf_config(tmp_path)))
    torch.testing.assert_close(names["model.layers.1.self_attn.qkv_proj.weight"], model.model.layers[1].self_attn.qkv_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(names["model.layers.0.mlp.gate_up_proj.weight"], model.model.layers[0].mlp.gate_up_proj.weight, rtol=0, atol=0)
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n in names)


def test_resolve_model_paths(tmp_path) -> None:
    default = resolve_model(None)
    assert default.kind == "gguf" and default.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default.served_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).kind == "hf"


def test_unknown_hub_id_offline_is_one_line_error(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-org/no-such-model-xyz")
    msg = str(info.value)
    assert "no-such-org/no-such-model-xyz" in msg and "\n" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
