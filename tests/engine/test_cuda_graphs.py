"""The engine on CUDA: decode steps replayed as CUDA graphs, Triton decode attention, SDPA prefill,
the miniature Phi-4 loaded from its safetensors shards onto the GPU, checked token for token against
transformers on the CPU. The GPU tests run where there is a GPU (the CPU-only suite skips them)."""

from __future__ import annotations

import random

import pytest
import torch

from phiserve.engine.cuda_graphs import capture_sizes
from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.engine.sampling_params import SamplingParams
from phiserve.models.loader import load_model
from phiserve.tokenizer.tokenizer import Tokenizer
from tests.models import phi4_miniature as mini

CUDA = torch.device("cuda")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MAX_NEW = 10


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs() -> None:
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(1) == [1]


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):  # noqa: ANN201
    """(transformers model on the CPU in fp32, its checkpoint folder, prompts, greedy references)."""
    model = mini.make_model(seed=3)
    folder = mini.write_checkpoint(tmp_path_factory.mktemp("phi4") / "phi-4-mini", model, release="fixed")
    rng = random.Random(0)
    lengths = [5, 17, 40, 130, 300, 9]  # 300 > the step budget below: prefilled in chunks over the cache
    prompts = [[rng.randrange(100, mini.FIRST_ADDED) for _ in range(n)] for n in lengths]
    references = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(MAX_NEW):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            references.append(ids[len(prompt) :])
    return model, folder, prompts, references


def cuda_engine(folder, dtype: torch.dtype, graphs: bool, kv_tokens: int = 4096) -> LLMEngine:  # noqa: ANN001
    _, decoder, _ = load_model(str(folder), dtype=dtype, device=CUDA)
    per_token = 2 * mini.LAYERS * mini.KV_HEADS * mini.HEAD_DIM * torch.empty((), dtype=dtype).element_size()
    config = EngineConfig(
        block_size=16, kv_cache_bytes=kv_tokens * per_token, max_num_batched_tokens=128, max_num_seqs=8, cuda_graphs=graphs
    )
    return LLMEngine(decoder, Tokenizer.from_hf_folder(folder), config, CUDA, dtype)


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = MAX_NEW) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: list[list[int]] = [[] for _ in prompts]
    while engine.has_work():
        for out in engine.step():
            tokens[int(out.request_id)].extend(out.token_ids)
    return tokens


@needs_gpu
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_greedy_matches_transformers(miniature, graphs) -> None:
    _, folder, prompts, references = miniature
    engine = cuda_engine(folder, torch.float32, graphs)
    assert next(engine.model.parameters()).is_cuda
    assert generate(engine, prompts) == references
    # decode-only steps went through the graphs (or, eager, never did)
    assert (engine.runner.graph_steps > 0) == graphs
    # again: every prompt now starts from its cached blocks, same tokens, pool whole afterwards
    hits = engine.block_manager.prefix_hits
    assert generate(engine, prompts) == references
    assert engine.block_manager.prefix_hits > hits
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@needs_gpu
def test_preempted_sequences_finish_with_the_same_tokens(miniature) -> None:
    _, folder, prompts, references = miniature
    engine = cuda_engine(folder, torch.float32, graphs=True, kv_tokens=480)  # 30 blocks for ~560 tokens
    assert generate(engine, prompts) == references
    assert engine.runner.graph_steps > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@needs_gpu
def test_bfloat16_graphs_give_the_eager_logits(miniature) -> None:
    """Phi-4's own precision: a graph replay computes what the same step computes eagerly (up to
    cuBLAS choosing other kernels for the padded batch)."""
    _, folder, prompts, _ = miniature
    logits = {}
    for graphs in (True, False):
        engine = cuda_engine(folder, torch.bfloat16, graphs)
        run, seen = engine.runner.run, []

        def recording(batch, run=run, seen=seen):  # noqa: ANN001, ANN202
            out = run(batch)
            if not seen and len(batch.seqs) >= 3 and all(n == 1 for n in batch.num_new_tokens):
                seen.append(out[0].float().cpu())  # the first decode-only step of three rows or more
            return out

        engine.runner.run = recording
        generate(engine, prompts, max_tokens=8)
        logits[graphs] = seen[0]
        assert (engine.runner.graph_steps > 0) == graphs
    assert logits[True].shape == logits[False].shape  # the same step: both engines schedule alike
    torch.testing.assert_close(logits[True], logits[False], atol=0.05, rtol=0.02)
