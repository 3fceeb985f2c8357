"""Grammar-constrained decoding in the engine, on a tiny random decoder with the embedded model's tokenizer.

A random model writes junk, so whatever it produces under a grammar shows the constraint at work.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from phiserve.engine.grammar import GrammarBackend, batch_mask
from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.engine.sampling_params import SamplingParams
from phiserve.models.config import ModelConfig
from phiserve.models.decoder import Decoder
from phiserve.models.loader import resolve_model
from phiserve.tokenizer.tokenizer import Tokenizer
from phiserve.tools.formats import TAGGED
from phiserve.tools.grammars import forced_calls_grammar, json_object_grammar, json_schema_grammar
from phiserve.tools.stream import ForcedCallStream, collect

VOCAB = 49152
STOP = [2]  # <|im_end|>
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["color", "ok", "n", "tags"],
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(resolve_model(None).path)


@pytest.fixture(scope="module")
def model() -> Decoder:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
    m = Decoder(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.lm_head.weight.normal_(0, 1.0)
    return m.eval()


@pytest.fixture(scope="module")
def engine(model, tokenizer) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(block_size=4, kv_cache_bytes=4096 * 256), torch.device("cpu"), torch.float32)


def params(grammar: str | None = None, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "max_tokens": 60, "stop_token_ids": STOP, "grammar": grammar, **kw})


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]], n: int = 1) -> dict[tuple[str, int], tuple[str, str | None]]:
    results: dict[tuple[str, int], list] = {}
    for rid, (prompt, p) in requests.items():
        for out in engine.add_request(rid, prompt, p, n):
            results[(rid, out.index)] = ["", out.finish_reason]
    steps = 0
    while engine.has_work():
        for out in engine.step():
            entry = results.setdefault((out.request_id, out.index), ["", None])
            entry[0] += out.text
            entry[1] = out.finish_reason
        steps += 1
        assert steps < 2000
    return {k: (v[0], v[1]) for k, v in results.items()}


def test_constrained_rows_follow_their_schema_and_others_are_untouched(engine, tokenizer):
    prompt = tokenizer.encode("Give me JSON please.")
    free = {f"free{k}": (prompt + [100 + k], params(temperature=0.0, max_tokens=12)) for k in range(3)}
    alone = run(engine, free)
    mixed = run(engine, {**free, **{f"json{k}": (prompt, params(json_schema_grammar(SCHEMA), seed=k)) for k in range(4)}})
    for key, value in alone.items():
        assert mixed[key] == value  # unconstrained rows pay nothing, not even a different token
    for k in range(4):
        text, reason = mixed[(f"json{k}", 0)]
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    assert engine._num_constrained == 0


def test_n_choices_each_get_a_matcher(engine, tokenizer):
    out = run(engine, {"r": (tokenizer.encode("Hi"), params(json_schema_grammar(SCHEMA), seed=5))}, n=3)
    assert len(out) == 3
    for text, reason in out.values():
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_forced_call_grammar_output_parses(engine, tokenizer):
    fns = [("get_weather", {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]}), ("get_time", None)]
    grammar = forced_calls_grammar(fns, TAGGED, many=False)
    out = run(engine, {f"c{k}": (tokenizer.encode("Call a tool."), params(grammar, seed=k)) for k in range(3)})
    for text, reason in out.values():
        assert reason == "stop"  # one call and the grammar is complete
        s = ForcedCallStream(TAGGED)
        msg = collect(s.feed(text) + s.finish())
        assert msg.content is None and len(msg.calls) == 1
        call = msg.calls[0]
        assert call.name in ("get_weather", "get_time")
        assert json.loads(call.arguments) in ({"unit": "c"}, {"unit": "f"}, {})


def test_json_object_with_length_cut(engine, tokenizer):
    text, reason = run(engine, {"j": (tokenizer.encode("x"), params(json_object_grammar(), seed=1, max_tokens=3))})[("j", 0)]
    assert text.startswith("{")
    assert reason in ("length", "stop")


def test_masks_are_computed_only_when_a_row_is_constrained(engine, tokenizer, monkeypatch):
    calls: list[tuple[int, int]] = []
    original = engine.grammars.compute_masks

    def spy(rows):
        calls.append(len(rows))
        return original(rows)

    monkeypatch.setattr(engine.grammars, "compute_masks", spy)
    run(engine, {"free": (tokenizer.encode("Hello"), params(temperature=0.0, max_tokens=5))})
    assert calls == []
    run(engine, {"free": (tokenizer.encode("Hello"), params(temperature=0.0, max_tokens=5)), "g": (tokenizer.encode("Hello"), params(json_object_grammar(), seed=2, max_tokens=5))})
    assert calls and all(constrained == 1 for constrained in calls)


def test_broken_grammar_finishes_the_choice_instead_of_crashing(engine, tokenizer):
    out = run(engine, {"bad": (tokenizer.encode("x"), params("start: ( this is not a grammar"))})
    assert out[("bad", 0)] == ("", "stop")
    assert engine.grammars.validate("start: ( this is not a grammar")
    assert engine.grammars.validate(json_object_grammar()) is None


def test_accepting_rows_allow_the_model_stop_tokens(tokenizer):
    backend = GrammarBackend(tokenizer, VOCAB)
    grammar = forced_calls_grammar([("noop", None)], TAGGED, many=True)
    matcher = backend.matcher(grammar)
    for token in tokenizer.encode(TAGGED.render("noop", "{}")):
        assert matcher.advance(token)
    assert matcher.is_accepting and not matcher.is_done
    mask = batch_mask(2, backend.compute_masks([(matcher, [2, 7])]), [1])
    assert mask[0].all()  # unconstrained row
    assert mask[1, 2] and mask[1, 7]
    assert mask[1, tokenizer.encode("<")[0]]  # another call may follow
    assert not mask[1, tokenizer.encode("hello")[0]]


def test_masks_follow_rows_when_prefills_join_running_decodes(engine, tokenizer):
    """The runner puts prefill chunks before decodes; masks must still land on their own sequences."""
    texts = {k: "" for k in range(3)}
    reasons: dict[int, str | None] = {}
    for k in range(3):
        engine.add_request(f"g{k}", tokenizer.encode("JSON:"), params(json_schema_grammar(SCHEMA), seed=10 + k))
    steps = 0
    while engine.has_work():
        if steps in (2, 4, 6):  # long unconstrained prompts arrive while the constrained rows decode
            engine.add_request(f"p{steps}", tokenizer.encode("word " * 40), params(temperature=0.0, max_tokens=3))
        for out in engine.step():
            if out.request_id.startswith("g"):
                k = int(out.request_id[1:])
                texts[k] += out.text
                reasons[k] = out.finish_reason
        steps += 1
    for k in range(3):
        assert reasons[k] == "stop"
        jsonschema.validate(json.loads(texts[k]), SCHEMA)


def test_forced_text_is_fast_forwarded(engine, tokenizer):
    grammar = forced_calls_grammar([("get_weather", {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"]})], TAGGED, many=False)
    engine.add_request("ff", tokenizer.encode("Call."), params(grammar, seed=1))
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    text = "".join(o.text for o in outputs)
    valid = (TAGGED.render("get_weather", '{"unit": "celsius"}'), TAGGED.render("get_weather", '{"unit": "fahrenheit"}'))
    assert text in valid
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].num_output_tokens == sum(len(o.token_ids) for o in outputs)
    assert len(outputs) <= 4  # a handful of sampled tokens; everything else was forced in chunks
    with_logprobs = run(engine, {"lp": (tokenizer.encode("Call."), params(grammar, seed=1, logprobs=True))})
    lp_text, lp_reason = with_logprobs[("lp", 0)]
    assert lp_text in valid and lp_reason == "stop"  # every token sampled (each carries a logprob)
