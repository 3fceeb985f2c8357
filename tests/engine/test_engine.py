"""Scheduler and engine behaviour on a tiny random decoder (the embedded model's tokenizer for text)."""

from __future__ import annotations

import random

import pytest
import torch

from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.engine.sampling_params import SamplingParams
from phiserve.models.config import ModelConfig
from phiserve.models.decoder import Decoder
from phiserve.models.loader import resolve_model
from phiserve.tokenizer.tokenizer import Tokenizer

VOCAB = 49152


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


def make_engine(model: Decoder, tokenizer: Tokenizer, kv_tokens: int = 4096, **kw) -> LLMEngine:
    per_token = 2 * 2 * 2 * 16 * 4
    cfg = EngineConfig(block_size=4, kv_cache_bytes=kv_tokens * per_token, **kw)
    return LLMEngine(model, tokenizer, cfg, torch.device("cpu"), torch.float32)


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[int]] = {rid: [] for rid in requests}
    steps = 0
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
        steps += 1
        assert steps < 10_000
    return tokens


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, VOCAB) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def reference_greedy(model: Decoder, prompt: list[int], n: int) -> list[int]:
    """No cache, no batching: recompute the whole sequence every token."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor(ids), torch.arange(len(ids)))
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt) :]


def test_engine_matches_uncached_reference(model, tokenizer):
    ps = prompts(3)
    engine = make_engine(model, tokenizer)
    got = run_all(engine, {str(i): (p, greedy()) for i, p in enumerate(ps)})
    for i, p in enumerate(ps):
        assert got[str(i)] == reference_greedy(model, p, 12)


def test_batch_invariance_16_concurrent(model, tokenizer):
    ps = prompts(16, seed=1)
    alone = {}
    for i, p in enumerate(ps):
        alone.update(run_all(make_engine(model, tokenizer), {str(i): (p, greedy())}))
    together = run_all(make_engine(model, tokenizer), {str(i): (p, greedy()) for i, p in enumerate(ps)})
    assert together == alone


def test_token_budget_and_decodes_never_starved(model, tokenizer):
    engine = make_engine(model, tokenizer, max_num_batched_tokens=32, max_num_seqs=8)
    for i, p in enumerate(prompts(4, seed=2, lo=3, hi=8)):
        engine.add_request(f"short{i}", p, greedy(40))
    for _ in range(3):
        engine.step()
    engine.add_request("long", prompts(1, seed=3, lo=300, hi=301)[0], greedy(4))
    sched = engine.scheduler
    saw_chunked_prefill = False
    for _ in range(30):
        decoding = [s for s in sched.running if s.num_computed_tokens == s.num_tokens - 1 or s.num_output_tokens > 0]
        batch = sched.schedule()
        assert batch.total_tokens <= 32
        scheduled = {s.seq_id for s in batch.seqs}
        assert all(s.seq_id in scheduled for s in decoding)  # every running decode gets its token
        if any(n > 1 for n in batch.num_new_tokens):
            saw_chunked_prefill = True
        # run the scheduled batch through the rest of the step
        logits, sampling = engine.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            engine.block_manager.register_computed(seq)
        if sampling:
            for seq in sampling:
                if not engine.sampler.has(seq.seq_id):
                    engine.sampler.add(seq.seq_id, seq.params, seq.token_ids[: seq.num_prompt_tokens])
            out = engine.sampler.sample(logits, [s.seq_id for s in sampling])
            for seq, tok, lp in zip(sampling, out.token_ids, out.logprobs, strict=True):
                engine._append_token(engine._choices[seq.seq_id], tok, lp)
    assert saw_chunked_prefill


def test_preempted_sequences_finish_with_same_output(model, tokenizer):
    ps = prompts(8, seed=4, lo=20, hi=40)
    roomy = run_all(make_engine(model, tokenizer), {str(i): (p, greedy(24)) for i, p in enumerate(ps)})
    tight = make_engine(model, tokenizer, kv_tokens=140)  # far less than 8 x 64 tokens
    got = run_all(tight, {str(i): (p, greedy(24)) for i, p in enumerate(ps)})
    assert tight.scheduler.num_preemptions > 0
    assert got == roomy
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks


def test_prefix_cache_hits_and_same_output(model, tokenizer):
    shared = prompts(1, seed=5, lo=64, hi=65)[0]
    engine = make_engine(model, tokenizer)
    first = run_all(engine, {"a": (shared + [101, 102], greedy())})
    before = engine.block_manager.prefix_hits
    second = run_all(engine, {"b": (shared + [101, 102], greedy())})
    assert engine.block_manager.prefix_hits - before >= 64
    assert first["a"] == second["b"]


def test_n_choices_share_prompt_and_abort_frees_everything(model, tokenizer):
    engine = make_engine(model, tokenizer)
    p = prompts(1, seed=6, lo=40, hi=41)[0]
    engine.add_request("n", p, SamplingParams(temperature=1.0, seed=3, max_tokens=50), n=3)
    engine.add_request("x", p, greedy(50))
    for _ in range(5):
        engine.step()
    outs = engine.abort("n") + engine.abort("x")
    assert sorted(o.index for o in outs if o.request_id == "n") == [0, 1, 2]
    assert all(o.finish_reason == "abort" for o in outs)
    assert not engine.has_work()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_tokens_zero_finishes_at_once(model, tokenizer):
    engine = make_engine(model, tokenizer)
    outs = engine.add_request("z", [1, 2, 3], SamplingParams(max_tokens=0))
    assert [(o.finish_reason, o.num_output_tokens) for o in outs] == [("length", 0)]
    assert not engine.has_work()
