"""Sampler tests: the batched pipeline against a plain per-row Python reference, distribution and
determinism checks, incremental penalty state, logprobs and slot reuse."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from phiserve.engine.sampler import Sampler
from phiserve.engine.sampling_params import SamplingParams
from phiserve.models import cpu_kernels

V = 256
INF = float("inf")


# ---- plain per-row reference --------------------------------------------------------------------
def _softmax(x: list[float]) -> list[float]:
    m = max(x)
    e = [math.exp(v - m) if v != -INF else 0.0 for v in x]
    s = sum(e)
    return [v / s for v in e]


def ref_process(row: list[float], p: SamplingParams, prompt: list[int], generated: list[int]) -> list[float]:
    """One row, one stage at a time, in float64 Python: what Sampler.process_logits should return."""
    x = list(row)
    for t, b in p.logit_bias.items():
        x[t] += b
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(generated):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(generated).items():
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    if p.temperature == 0.0:
        return x
    x = [v / p.temperature for v in x]
    if p.top_k > 0:
        kth = sorted(x, reverse=True)[min(p.top_k, len(x)) - 1]
        x = [v if v >= kth else -INF for v in x]
    if p.top_p < 1.0:
        probs = _softmax(x)
        keep, mass = set(), 0.0
        for i in sorted(range(len(x)), key=lambda i: -probs[i]):
            keep.add(i)
            mass += probs[i]
            if mass >= p.top_p:
                break
        x = [v if i in keep else -INF for i, v in enumerate(x)]
    if p.min_p > 0.0:
        probs = _softmax(x)
        cut = p.min_p * max(probs)
        x = [v if probs[i] >= cut else -INF for i, v in enumerate(x)]
    return x


def ref_argmax(x: list[float]) -> int:
    return max(range(len(x)), key=lambda i: x[i])


# ---- helpers --------------------------------------------------------------------------------------
def _rand_logits(gen: torch.Generator, b: int, v: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v, generator=gen) * scale


def _setup(params: list[SamplingParams], steps: int = 6, seed: int = 0, v: int = V, scale: float = 3.0):
    """Add one sequence per params, run a few sampling steps so penalty state builds up."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    sampler = Sampler(v, len(params) + 2)
    prompts = [[rng.randrange(v) for _ in range(rng.randrange(1, 20))] for _ in params]
    history: list[list[int]] = [[] for _ in params]
    for i, p in enumerate(params):
        sampler.add(100 + i, p, prompts[i])
    ids = [100 + i for i in range(len(params))]
    for _ in range(steps):
        out = sampler.sample(_rand_logits(gen, len(params), v, scale), ids)
        for h, t in zip(history, out.token_ids, strict=True):
            h.append(t)
    return sampler, ids, prompts, history, gen


def _check_against_reference(params: list[SamplingParams], seed: int = 0, v: int = V, scale: float = 3.0) -> None:
    sampler, ids, prompts, history, gen = _setup(params, seed=seed, v=v, scale=scale)
    logits = _rand_logits(gen, len(params), v, scale)
    got = sampler.process_logits(logits, ids)
    for i, p in enumerate(params):
        want = torch.tensor(ref_process(logits[i].tolist(), p, prompts[i], history[i]), dtype=torch.float64)
        g = got[i].double()
        assert torch.equal(torch.isinf(g), torch.isinf(want)), f"row {i}: different tokens removed ({p})"
        finite = ~torch.isinf(want)
        torch.testing.assert_close(g[finite], want[finite], rtol=1e-5, atol=1e-5)


CASES = {
    "plain": SamplingParams(),
    "bias": SamplingParams(logit_bias={3: 5.0, 17: -100.0, 200: 2.5}),
    "repetition": SamplingParams(repetition_penalty=1.3),
    "repetition_below_1": SamplingParams(repetition_penalty=0.8),
    "presence_frequency": SamplingParams(presence_penalty=0.7, frequency_penalty=0.4),
    "negative_penalties": SamplingParams(presence_penalty=-0.5, frequency_penalty=-0.3),
    "temperature": SamplingParams(temperature=0.6),
    "top_k": SamplingParams(top_k=10),
    "top_p": SamplingParams(top_p=0.8),
    "top_p_small": SamplingParams(top_p=0.05),
    "min_p": SamplingParams(min_p=0.1),
    "greedy": SamplingParams(temperature=0.0, presence_penalty=0.5, repetition_penalty=1.2),
    "combined": SamplingParams(
        temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, presence_penalty=0.3,
        frequency_penalty=0.2, repetition_penalty=1.1, logit_bias={5: 3.0, 6: -2.0},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_filter_matches_reference(name: str) -> None:
    # Same params on 4 rows (each with its own prompt/history), then the row alone.
    _check_against_reference([CASES[name]] * 4, seed=1)
    _check_against_reference([CASES[name]], seed=2)


def test_mixed_batch_matches_reference() -> None:
    # Every row has different params, so per-row parameter tensors and fast paths are exercised.
    for seed in range(3):
        _check_against_reference(list(CASES.values()), seed=seed)


def test_wide_nucleus_and_large_top_k_match_reference() -> None:
    # Flat logits over a 4096 vocab: the top-p nucleus and top-k reach past the 1024-token head
    # the sampler examines first, forcing its full-vocabulary fallback.
    params = [
        SamplingParams(top_p=0.9), SamplingParams(top_k=2000), SamplingParams(top_k=3000, top_p=0.95),
        SamplingParams(top_p=0.5, min_p=0.3), SamplingParams(),
    ]
    _check_against_reference(params, seed=11, v=4096, scale=0.5)
    _check_against_reference(params[:1], seed=12, v=4096, scale=0.5)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=1), SamplingParams(min_p=1.0), SamplingParams(temperature=0.0), SamplingParams(top_p=1e-6)],
    ids=["top_k=1", "min_p=1", "temperature=0", "tiny_top_p"],
)
def test_degenerate_settings_equal_argmax(params: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(3)
    sampler = Sampler(V, 8)
    ids = list(range(8))
    for i in ids:
        sampler.add(i, params, [])
    for _ in range(5):
        logits = _rand_logits(gen, 8)
        out = sampler.sample(logits, ids)
        assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_with_penalties_is_argmax_of_processed() -> None:
    p = CASES["greedy"]
    sampler, ids, prompts, history, gen = _setup([p, SamplingParams(temperature=0.5, top_p=0.5)] * 3)
    logits = _rand_logits(gen, len(ids))
    out = sampler.sample(logits, ids)
    for i in range(0, len(ids), 2):
        assert out.token_ids[i] == ref_argmax(ref_process(logits[i].tolist(), p, prompts[i], history[i]))


def test_empirical_distribution_chi_square() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.5])
    n_draws, temperature = 5000, 0.7
    sampler = Sampler(8, 1)
    sampler.add(0, SamplingParams(temperature=temperature, seed=1234), [])
    counts = [0] * 8
    for _ in range(n_draws):
        counts[sampler.sample(logits.unsqueeze(0), [0]).token_ids[0]] += 1
    expected = [n_draws * q for q in torch.softmax(logits.double() / temperature, dim=0).tolist()]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True))
    assert chi2 < 24.32, f"chi-square {chi2:.2f} >= 24.32 (df=7, p=0.001); counts={counts}"


def test_temperature_changes_distribution() -> None:
    # Guards the chi-square test: a hot sampler must fail the cold distribution's expectations.
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.5])
    sampler = Sampler(8, 1)
    sampler.add(0, SamplingParams(temperature=2.0, seed=1234), [])
    counts = [0] * 8
    for _ in range(2000):
        counts[sampler.sample(logits.unsqueeze(0), [0]).token_ids[0]] += 1
    expected = [2000 * q for q in torch.softmax(logits.double() / 0.7, dim=0).tolist()]
    assert sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True)) > 24.32


def test_filtered_tokens_are_never_sampled() -> None:
    gen = torch.Generator().manual_seed(4)
    params = [SamplingParams(top_k=5, seed=1), SamplingParams(top_p=0.3, seed=2), SamplingParams(min_p=0.2, seed=3)]
    sampler = Sampler(V, 3)
    for i, p in enumerate(params):
        sampler.add(i, p, [])
    for _ in range(50):
        logits = _rand_logits(gen, 3, scale=1.0)
        allowed = ~torch.isinf(sampler.process_logits(logits, [0, 1, 2]))
        out = sampler.sample(logits, [0, 1, 2])
        for i, t in enumerate(out.token_ids):
            assert allowed[i, t]


def _whole_row_draws(params: list[SamplingParams], logits: torch.Tensor) -> list[int]:
    """Reference: filter whole rows (process_logits), draw by inverse CDF in token-id order with
    each row's first uniform from a generator seeded like the sampler's."""
    ref = Sampler(logits.shape[1], len(params))
    for i, p in enumerate(params):
        ref.add(i, p, [])
    probs = torch.softmax(ref.process_logits(logits, list(range(len(params)))).double(), dim=-1)
    tokens = []
    for p, row in zip(params, probs, strict=True):
        u = torch.rand((), generator=torch.Generator().manual_seed(p.seed)).item()
        cdf = row.cumsum(0)
        tokens.append(int(torch.searchsorted(cdf, u * cdf[-1], right=True)))
    return tokens


@pytest.mark.parametrize("shape", ["peaked", "flat", "very_flat", "ties"])
def test_candidate_draws_equal_whole_row_draws(shape: str) -> None:
    # sample() draws top-k / top-p rows within slices of 64 or 1,024 candidates and falls back to
    # the whole row when survivors may reach past them: same tokens as filtering whole rows.
    v, b = 4096, 24
    gen = torch.Generator().manual_seed(11)
    scale = {"peaked": 4.0, "flat": 0.3, "very_flat": 0.02, "ties": 1.0}[shape]
    logits = torch.randn(b, v, generator=gen) * scale
    if shape == "ties":  # 300 tokens tied at the top: every top-k below 300 keeps all of them
        logits[:, :300] = logits.max() + 1
    settings = [
        dict(top_k=40), dict(top_k=63), dict(top_k=64), dict(top_k=600), dict(top_p=0.9), dict(top_p=0.5),
        dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8), dict(top_k=3000, top_p=0.99), dict(top_p=0.999, min_p=0.2),
    ]
    params = [SamplingParams(seed=1000 + i, **settings[i % len(settings)]) for i in range(b)]
    sampler = Sampler(v, b)
    for i, p in enumerate(params):
        sampler.add(i, p, [])
    got = sampler.sample(logits, list(range(b))).token_ids
    assert got == _whole_row_draws(params, logits)


@pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernels unavailable here")
def test_kernel_candidate_draws_equal_torch_draws(monkeypatch) -> None:
    """Our CPU kernel's filtered draw (sample_candidates) against the same stages in torch ops, row
    for row: peaked, flat and tied rows, banned (-inf) tokens, bias, every filter combination."""
    v, b = 4096, 32
    gen = torch.Generator().manual_seed(5)
    settings = [
        dict(top_k=40, top_p=0.95, min_p=0.05, temperature=0.8), dict(top_k=1), dict(top_k=64), dict(top_k=65),
        dict(top_p=0.7), dict(top_p=0.99, min_p=0.3), dict(top_k=500, top_p=0.9), dict(top_k=20, min_p=0.5, temperature=1.7),
    ]
    params = [SamplingParams(seed=77 + i, logit_bias={3: 5.0, 9: -100.0}, **settings[i % len(settings)]) for i in range(b)]
    allowed = torch.rand(b, v, generator=gen) > 0.1
    for scale in (0.05, 1.0, 6.0):
        logits = torch.randn(b, v, generator=gen) * scale
        logits[::5, 100:140] = logits.max() + 1  # ties at the top
        tokens = {}
        for kernel in (True, False):
            sampler = Sampler(v, b)
            for i, p in enumerate(params):
                sampler.add(i, p, [])
            if not kernel:
                monkeypatch.setattr(cpu_kernels, "usable", lambda *tensors, **kwargs: False)
            tokens[kernel] = sampler.sample(logits, list(range(b)), allowed).token_ids
            monkeypatch.undo()
        assert tokens[True] == tokens[False], scale
        assert all(allowed[i, t] for i, t in enumerate(tokens[True]))


# ---- determinism ------------------------------------------------------------------------------------
TARGETS = [
    SamplingParams(temperature=0.9, seed=42),  # no filters: fast paths alone, full paths in the batch
    SamplingParams(temperature=0.8, top_p=0.9, top_k=50, presence_penalty=0.5, seed=7),
    SamplingParams(min_p=0.05, repetition_penalty=1.2, logit_bias={1: 2.0}, seed=-3),
]
OTHERS = [
    SamplingParams(temperature=0.0),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.5, temperature=1.3),
    SamplingParams(min_p=0.2, frequency_penalty=1.0, logprobs=True, top_logprobs=3),
    SamplingParams(repetition_penalty=1.5, logit_bias={0: 10.0}),
]


def _run(
    sampler: Sampler, ids: list[int], rows: dict[int, int], step_logits: list[dict[int, torch.Tensor]],
    b: int, gen: torch.Generator,
) -> dict[int, list[int]]:
    """Sample one step per entry; batch row rows[seq] carries seq's fixed logits, the rest are random."""
    out: dict[int, list[int]] = {s: [] for s in ids}
    for lg in step_logits:
        batch = _rand_logits(gen, b)
        for s, r in rows.items():
            batch[r] = lg[s]
        res = sampler.sample(batch, ids)
        for s, t in zip(ids, res.token_ids, strict=True):
            out[s].append(t)
    return out


@pytest.mark.parametrize("target", range(len(TARGETS)))
def test_same_seed_same_tokens_alone_and_in_batch(target: int) -> None:
    gen = torch.Generator().manual_seed(5)
    steps = [{0: _rand_logits(gen, 1, scale=1.0)[0]} for _ in range(8)]  # target is seq id 0
    prompt = [1, 2, 3, 1]
    p = TARGETS[target]

    alone = Sampler(V, 1)
    alone.add(0, p, prompt)
    tokens_alone = _run(alone, [0], {0: 0}, steps, 1, gen)[0]

    # Batch of 8 with mixed params; the target sits in the middle, other seeded targets alongside.
    batch = Sampler(V, 16)
    others = [*OTHERS, *(t for i, t in enumerate(TARGETS) if i != target)]
    ids = [11, 12, 13, 0, 14, 15, 16, 17]
    for sid, op in zip([i for i in ids if i != 0], others, strict=True):
        batch.add(sid, op, [5, 6])
    batch.add(0, p, prompt)
    tokens_batch = _run(batch, ids, {0: 3}, steps, 8, gen)[0]
    assert tokens_alone == tokens_batch
    # Tokens actually vary step to step (the test would be vacuous otherwise).
    assert len(set(tokens_alone)) > 1


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, V)  # uniform: any two seeds collide on 10 draws with negligible odds
    results = []
    for seed in (1, 2):
        s = Sampler(V, 1)
        s.add(0, SamplingParams(seed=seed), [])
        results.append([s.sample(logits, [0]).token_ids[0] for _ in range(10)])
    assert results[0] != results[1]


def test_unseeded_requests_are_not_identical() -> None:
    logits = torch.zeros(2, V)
    s = Sampler(V, 2)
    s.add(0, SamplingParams(), [])
    s.add(1, SamplingParams(), [])
    draws = [s.sample(logits, [0, 1]).token_ids for _ in range(10)]
    assert [d[0] for d in draws] != [d[1] for d in draws]


# ---- state ------------------------------------------------------------------------------------------
def test_incremental_state_equals_recomputed() -> None:
    params = [CASES["plain"], CASES["combined"], CASES["greedy"], SamplingParams(top_k=2)]
    sampler, ids, prompts, history, _ = _setup(params, steps=25, seed=6)
    sampler.record_tokens(ids[0], [7, 7, 9])
    history[0] += [7, 7, 9]
    for sid, prompt, hist in zip(ids, prompts, history, strict=True):
        slot = sampler._slot_of[sid]
        counts = torch.bincount(torch.tensor(hist), minlength=V).to(torch.int32)
        assert torch.equal(sampler._counts[slot], counts)
        seen = torch.zeros(V, dtype=torch.bool)
        seen[torch.tensor(prompt + hist)] = True
        assert torch.equal(sampler._seen[slot], seen)


def test_logprobs_match_raw_log_softmax() -> None:
    params = [
        SamplingParams(logprobs=True, top_logprobs=5, temperature=0.5, presence_penalty=1.0, top_k=20),
        SamplingParams(),
        SamplingParams(logprobs=True, top_logprobs=0, temperature=0.0, logit_bias={9: 50.0}),
        SamplingParams(logprobs=True, top_logprobs=2),
    ]
    sampler, ids, _, _, gen = _setup(params, seed=8)
    logits = _rand_logits(gen, len(params))
    out = sampler.sample(logits, ids)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[1] is None
    assert out.token_ids[2] == 9  # the bias decides the token, but logprobs stay the model's own
    for i in (0, 2, 3):
        lp = out.logprobs[i]
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, out.token_ids[i]].item(), abs=1e-5)
        n = params[i].top_logprobs
        vals, idx = ref[i].topk(n)
        assert [t for t, _ in lp.top_logprobs] == idx.tolist()
        assert [v for _, v in lp.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-5)


def test_slot_reuse_resets_state_and_seed() -> None:
    gen = torch.Generator().manual_seed(9)
    steps = [_rand_logits(gen, 1, scale=0.5) for _ in range(6)]
    p = SamplingParams(seed=77, presence_penalty=2.0, repetition_penalty=1.5)

    fresh = Sampler(V, 1)
    fresh.add(1, p, [4, 5])
    want = [fresh.sample(lg, [1]).token_ids[0] for lg in steps]

    s = Sampler(V, 1)
    s.add(0, SamplingParams(seed=3, frequency_penalty=1.0), list(range(30)))
    for lg in steps:
        s.sample(lg, [0])
    s.remove(0)
    assert not s.has(0) and s.num_free_slots == 1
    s.add(1, p, [4, 5])
    slot = s._slot_of[1]
    assert int(s._counts[slot].sum()) == 0
    assert s._seen[slot].nonzero().flatten().tolist() == [4, 5]
    assert [s.sample(lg, [1]).token_ids[0] for lg in steps] == want


def test_slot_errors() -> None:
    s = Sampler(V, 2)
    s.add(0, SamplingParams(), [])
    with pytest.raises(ValueError):
        s.add(0, SamplingParams(), [])
    with pytest.raises(ValueError):
        s.add(5, SamplingParams(logit_bias={V: 1.0}), [])  # bad request must not leak a slot
    s.add(1, SamplingParams(), [])
    with pytest.raises(RuntimeError):
        s.add(2, SamplingParams(), [])
    with pytest.raises(KeyError):
        s.sample(torch.zeros(1, V), [2])
    with pytest.raises(KeyError):
        s.remove(2)
    s.remove(0)
    s.add(2, SamplingParams(), [])
    assert s.has(2) and s.has(1) and not s.has(0)


def test_allowed_mask_constrains_every_row() -> None:
    gen = torch.Generator().manual_seed(10)
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=1), SamplingParams(top_p=0.5, seed=2), SamplingParams()]
    s = Sampler(V, 4)
    for i, p in enumerate(params):
        s.add(i, p, [])
    for _ in range(20):
        logits = _rand_logits(gen, 4)
        allowed = torch.rand(4, V, generator=gen) < 0.1
        allowed[3] = True  # an all-True row is unconstrained
        out = s.sample(logits, [0, 1, 2, 3], allowed)
        for i, t in enumerate(out.token_ids):
            assert allowed[i, t]
        assert out.token_ids[0] == logits[0].masked_fill(~allowed[0], -INF).argmax().item()
    with pytest.raises(ValueError):
        s.sample(torch.zeros(4, V), [0, 1, 2, 3], torch.zeros(4, V, dtype=torch.bool))


def test_padded_vocab_columns_ignored() -> None:
    s = Sampler(V, 1)
    s.add(0, SamplingParams(temperature=0.0, logprobs=True, top_logprobs=1), [])
    logits = torch.zeros(1, V + 64)
    logits[0, V + 3] = 100.0  # padding column must never win
    logits[0, 11] = 1.0
    out = s.sample(logits, [0])
    assert out.token_ids == [11]
    assert out.logprobs[0] is not None and out.logprobs[0].top_logprobs[0][0] == 11


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_matches_cpu_greedy_and_filters() -> None:
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5), SamplingParams(top_k=5, seed=1), SamplingParams(top_p=0.5, min_p=0.1, seed=2)]
    cpu, gpu = Sampler(V, 3), Sampler(V, 3, "cuda")
    for i, p in enumerate(params):
        cpu.add(i, p, [1, 2])
        gpu.add(i, p, [1, 2])
    gen = torch.Generator().manual_seed(13)
    for _ in range(10):
        logits = _rand_logits(gen, 3)
        allowed = ~torch.isinf(cpu.process_logits(logits, [0, 1, 2]))
        a = cpu.sample(logits, [0, 1, 2]).token_ids
        b = gpu.sample(logits.cuda(), [0, 1, 2]).token_ids
        assert a[0] == b[0]
        assert all(allowed[i, t] for i, t in enumerate(b))
        # Keep the penalty state identical on both sides for the next step's greedy check.
        if a != b:
            return
