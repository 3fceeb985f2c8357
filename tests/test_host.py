"""Precision selection per device (the CUDA configuration is checked for shape and dtype on CPU)."""

from __future__ import annotations

import pytest
import torch

from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.engine.sampling_params import SamplingParams
from phiserve.host import ServeOptions, engine_config_for, pick_precision
from phiserve.models import cpu_kernels
from phiserve.models.config import ModelConfig
from phiserve.models.decoder import Decoder
from phiserve.models.loader import resolve_model
from phiserve.tokenizer.tokenizer import Tokenizer


def test_precision_choices():
    cuda = torch.device("cuda")
    assert pick_precision("auto", cuda, is_gguf=False).act_dtype == torch.bfloat16
    assert pick_precision("auto", cuda, is_gguf=True).weight_format is None
    with pytest.raises(ValueError):
        pick_precision("int4", cuda, is_gguf=True)
    cpu = pick_precision("auto", torch.device("cpu"), is_gguf=True)
    # our kernels take prefill rows too; with torch's kernels a dense copy serves them
    assert (cpu.act_dtype, cpu.weight_format, cpu.lm_head_format) == (torch.float32, "int4", "rescored")
    assert cpu.keep_dense is not cpu_kernels.available()
    assert pick_precision("auto", torch.device("cpu"), is_gguf=False).weight_format is None
    with pytest.raises(ValueError):
        pick_precision("fp8", torch.device("cpu"), is_gguf=True)


def test_bf16_engine_like_the_cuda_path():
    """bf16 weights, activations and KV cache through the whole engine (what --device cuda runs)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    model = Decoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model = model.to(torch.bfloat16).eval()
    tok = Tokenizer.from_gguf(resolve_model(None).path)
    engine = LLMEngine(model, tok, EngineConfig(block_size=4, kv_cache_bytes=2**22), torch.device("cpu"), torch.bfloat16)
    assert engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    engine.add_request("a", list(range(100, 140)), SamplingParams(temperature=0, max_tokens=8))
    engine.add_request("b", list(range(200, 205)), SamplingParams(temperature=0.7, seed=1, max_tokens=8))
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert all(len(t) == 8 and all(0 <= i < cfg.vocab_size for i in t) for t in tokens.values())
    # greedy in bf16 equals the uncached bf16 reference
    ids = list(range(100, 140))
    with torch.inference_mode():
        for _ in range(8):
            ids.append(int(model(torch.tensor(ids), torch.arange(len(ids)))[-1].argmax()))
    assert tokens["a"] == ids[40:]


def test_engine_settings_left_unset_keep_the_cpu_defaults_on_cpu() -> None:
    options = ServeOptions(engine=EngineConfig(block_size=8), engine_sized_by_device=frozenset({"kv_cache_bytes", "max_num_seqs"}))
    assert engine_config_for(options, torch.device("cpu")) == EngineConfig(block_size=8)
