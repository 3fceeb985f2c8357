"""Accuracy, speed and memory of each --dtype on the embedded model (the table in docs/performance.md).

Accuracy is measured like llama.cpp's KL-divergence check: next-token distributions over a fixed text
against a plain fp32 computation on the dequantized GGUF weights, through the decode path (one token
per step through the KV cache, as the server decodes). Greedy agreement: tokens of 5 chat prompts
that match the fp32 reference before the first difference (of 32). Speed: engine decode steps.

    .venv/bin/python bench/precision.py            # all formats
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import torch

from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.engine.sampling_params import SamplingParams
from phiserve.host import pick_precision
from phiserve.models.attention import AttentionMetadata
from phiserve.models.loader import load_model
from phiserve.tokenizer.chat_template import ChatTemplate
from phiserve.tokenizer.tokenizer import Tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about winter.",
    "What is 12 times 7?",
]
TEXT = (
    "The river town woke slowly on winter mornings. Before the sun cleared the hills, the baker had already lit his "
    "ovens, and the smell of fresh bread drifted down the narrow streets toward the harbor. Fishermen checked their "
    "nets by lantern light, talking quietly about the weather and the price of fuel. At the school on the corner, a "
    "teacher wrote the day's lesson on the board: the water cycle, with arrows pointing from the sea to the clouds "
    "and back again. By nine o'clock the market square was full. Farmers sold apples, potatoes and cheese from wooden "
    "stalls, and an old man played the violin near the fountain, hoping for a few coins."
)
FORMATS = ["auto", "float32", "bfloat16", "int8", "int4"]


def decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    n = len(ids)
    caches = [(torch.zeros(n, cfg.num_kv_heads, cfg.head_dim), torch.zeros(n, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
    rows = []
    with torch.inference_mode():
        for i in range(n):
            meta = AttentionMetadata.single_decode(i)
            rows.append(model(ids[i : i + 1], torch.tensor([i]), caches, meta, torch.tensor([0]), dense_rows=0)[0])
    return torch.stack(rows)


def greedy(model, tok: Tokenizer, batch: int = 1) -> tuple[list[list[int]], float]:
    template = ChatTemplate(tok.chat_template, tok.bos_token or "", tok.eos_token or "")
    engine = LLMEngine(model, tok, EngineConfig(), torch.device("cpu"), torch.float32)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), tok.encode(template.render([{"role": "user", "content": p}])), SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    # decode speed: `batch` sequences decoding together, after their prefill
    for i in range(batch):
        engine.add_request(f"s{i}", tok.encode(PROMPTS[i % 5]) * 4, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    while any(s.num_output_tokens == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    start, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    return [out[str(i)] for i in range(len(PROMPTS))], batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, reference, resolved = load_model(None)
    tok = Tokenizer.from_gguf(resolved.path)
    ids = torch.tensor(tok.encode(TEXT))
    with torch.inference_mode():
        ref_lp = reference(ids, torch.arange(len(ids))).log_softmax(-1)
    ref_tokens, _ = greedy(reference, tok)
    del reference
    gc.collect()
    print("| --dtype | weights (MiB) | KL vs fp32 | top-1 | greedy tokens = fp32 (of 5x32) | decode tok/s B=1 | B=8 |")
    print("|---|---|---|---|---|---|---|")
    for name in args.formats.split(","):
        p = pick_precision(name, torch.device("cpu"), is_gguf=True)
        _, model, _ = load_model(None, weight_format=p.weight_format, lm_head_format=p.lm_head_format, keep_dense=p.keep_dense)
        seen, size = set(), 0
        for t in [*model.parameters(), *(getattr(m, "packed", None) for m in model.modules()), *(getattr(m, "scales", None) for m in model.modules())]:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                size += t.numel() * t.element_size()
        lp = decode_logits(model, ids).log_softmax(-1)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item()
        top1 = (ref_lp.argmax(-1) == lp.argmax(-1)).float().mean().item()
        tokens, tps1 = greedy(model, tok, 1)
        _, tps8 = greedy(model, tok, 8)
        agree = sum(next((j for j, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), 32) for x, y in zip(ref_tokens, tokens, strict=True))
        print(f"| {name} | {size / 2**20:.0f} | {kl:.2g} | {top1:.1%} | {agree}/160 | {tps1:.1f} | {tps8:.1f} |", flush=True)
        del model
        gc.collect()
    print(f"(peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; {len(ids)} tokens of text)")


if __name__ == "__main__":
    main()
