"""The engine on a CUDA GPU, in process (no HTTP): random bf16 weights in a real model's shape,
decode steps replayed as CUDA graphs vs run eagerly, at 1, 16 and 64 concurrent sequences, plus
prefill throughput. Random weights time exactly what real ones would (same shapes, same kernels);
outputs run to max_tokens. Prints one JSON object per measurement and a table.

    python bench/engine_gpu.py --shape phi-4            # 29 GB of weights: an H100/H200-class GPU
    python bench/engine_gpu.py --shape smollm2-135m     # the embedded model's shape
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.engine.sampling_params import SamplingParams
from phiserve.models.config import ModelConfig
from phiserve.models.decoder import Decoder
from phiserve.tokenizer.tokenizer import Tokenizer

SHAPES = {
    "phi-4": ModelConfig(
        vocab_size=100352, hidden_size=5120, intermediate_size=17920, num_layers=40, num_heads=40, num_kv_heads=10,
        head_dim=128, rope_theta=250000.0, max_position_embeddings=16384, architecture="phi3",
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
    ),
}  # fmt: skip


def random_model(cfg: ModelConfig, device: torch.device) -> Decoder:
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = Decoder(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    return model.eval()


def word_tokenizer(vocab: int, folder: Path) -> Tokenizer:
    """Any tokenizer of the model's vocabulary size will do: the benchmark feeds token ids."""
    backend = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    return Tokenizer.from_hf_folder(folder)


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """All prompts at once; returns wall time, output tokens/s and the median time between tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    generated = 0
    while engine.has_work():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            generated += len(out.token_ids)
            if out.request_id in last:
                gaps.append((now - last[out.request_id]) / max(1, len(out.token_ids)))
            first.setdefault(out.request_id, now)
            last[out.request_id] = now
    wall = time.perf_counter() - start
    gaps.sort()
    ttft = sorted(t - start for t in first.values())
    return {
        "wall_s": round(wall, 3),
        "output_tok_s": round(generated / wall, 1),
        "tpot_p50_ms": round(1000 * gaps[len(gaps) // 2], 2) if gaps else None,
        "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 1),
    }


def replay_times(engine: LLMEngine) -> dict[str, float]:
    """Milliseconds of one forward pass alone (graph replay, no scheduling or sampling) per batch size,
    every row attending to 512 tokens (read from the pool's first blocks; writes go to the scratch slot)."""
    graphs, times = engine.runner.graphs, {}
    context = 512
    graphs.slot_mapping.fill_(graphs.scratch_block * graphs.block_size)
    graphs.positions.fill_(context - 1)
    graphs.context_lens.fill_(context)
    graphs.block_tables[:, : context // graphs.block_size] = torch.arange(context // graphs.block_size, dtype=torch.int32)
    for size, graph in graphs.graphs.items():
        graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        times[f"forward_ms_b{size}"] = round((time.perf_counter() - start) / 20 * 1000, 3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="phi-4")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=4096, help="one prompt of this length, max_tokens=1")
    parser.add_argument("--kv-cache-gib", type=float, default=16.0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--modes", nargs="+", choices=["graphs", "eager"], default=["graphs", "eager"], help="in this order")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    parser.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    cfg = SHAPES[args.shape]
    t0 = time.perf_counter()
    model = random_model(cfg, device)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = word_tokenizer(cfg.vocab_size, Path(folder))
    rng = random.Random(0)
    results = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__, "shape": args.shape, "weights_gib": round(weights_gib, 2), "runs": []}
    print(f"{args.shape}: {weights_gib:.1f} GiB of bf16 weights on {results['device']} in {time.perf_counter() - t0:.1f} s", flush=True)
    for graphs in (mode == "graphs" for mode in args.modes):
        config = EngineConfig(
            block_size=16,
            kv_cache_bytes=int(args.kv_cache_gib * 2**30),
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=max(args.concurrency),
            cuda_graphs=graphs,
        )
        t0 = time.perf_counter()
        engine = LLMEngine(model, tokenizer, config, device, torch.bfloat16)
        setup_s = time.perf_counter() - t0
        mode = "graphs" if graphs else "eager"
        # Warm-up: CUDA loads each kernel at its first launch (lazy module loading) and cuBLAS picks
        # algorithms per shape, so touch every path once: a chunked prompt (SDPA with and without a
        # cached context), mixed steps, decode batches of every measured size.
        warm = [[rng.randrange(1000, cfg.vocab_size) for _ in range(args.max_num_batched_tokens + 64)]]
        warm += [[rng.randrange(1000, cfg.vocab_size) for _ in range(32)] for _ in range(max(args.concurrency) - 1)]
        run(engine, warm, 8)
        if graphs and on_gpu:
            results["runs"] += [{"mode": "graph-replay", **replay_times(engine)}]
            print(json.dumps(results["runs"][-1]), flush=True)
        rows = []
        for c in args.concurrency:
            prompts = [[rng.randrange(1000, cfg.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(c)]
            rows.append({"mode": mode, "concurrency": c, **run(engine, prompts, args.output_tokens)})
        prefill_s = sorted(
            run(engine, [[rng.randrange(1000, cfg.vocab_size) for _ in range(args.prefill_tokens)]], 1)["wall_s"] for _ in range(3)
        )[1]  # median of three fresh prompts
        rows.append({"mode": mode, "prefill_tokens": args.prefill_tokens, "prefill_tok_s": round(args.prefill_tokens / prefill_s, 1)})
        for row in rows:
            row["setup_s"] = round(setup_s, 2)
            print(json.dumps(row), flush=True)
        results["runs"] += rows
        del engine
        if on_gpu:
            torch.cuda.empty_cache()
    if on_gpu:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
