"""Text held back as a possible stop-string start must be released when generation ends for another
reason: max_tokens (length) or an end-of-turn token (stop). The EOS case once dropped it."""

from __future__ import annotations

import pytest
import torch

from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.engine.sampling_params import SamplingParams
from phiserve.models.config import ModelConfig
from phiserve.models.decoder import Decoder
from phiserve.models.loader import resolve_model
from phiserve.tokenizer.tokenizer import Tokenizer

VOCAB = 49152
PROMPT = [1, 504, 3658, 314, 253, 1345, 30]


@pytest.fixture(scope="module")
def engine_parts() -> tuple[Decoder, Tokenizer]:
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)
    model = Decoder(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval(), Tokenizer.from_gguf(resolve_model(None).path)


def generate(parts: tuple[Decoder, Tokenizer], params: SamplingParams) -> tuple[str, list[int], str]:
    model, tokenizer = parts
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=4, kv_cache_bytes=1 << 20), torch.device("cpu"), torch.float32)
    engine.add_request("r", PROMPT, params)
    text, tokens, reason = "", [], None
    while engine.has_work():
        for out in engine.step():
            text += out.text
            tokens += out.token_ids
            reason = out.finish_reason or reason
    return text, tokens, reason


def test_held_text_is_released_at_end_of_turn_and_at_length(engine_parts):
    text, tokens, _ = generate(engine_parts, SamplingParams(temperature=0, max_tokens=12))
    # Make a later token the end-of-turn token, so the run ends with reason "stop" but no stop string.
    k = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    eos = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tokens[k]])
    plain, _, reason = generate(engine_parts, eos)
    assert reason == "stop" and plain
    # A stop string starting with the answer's last character: that character is held back until
    # the end, when it must come out.
    held, _, reason = generate(engine_parts, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tokens[k]], stop=[plain[-1] + "\x00"]))
    assert (held, reason) == (plain, "stop")
    held, _, reason = generate(engine_parts, SamplingParams(temperature=0, max_tokens=12, stop=[text[-1] + "\x00"]))
    assert (held, reason) == (text, "length")
