"""The default precision answers like the fp32 reference: greedy output on 5 chat prompts is identical for
the first 32 tokens, with our CPU kernels (exact int4 for every row, int8-ranked rescored head, float16
KV cache) and with torch's kernels as on a machine without a compiler (int4 decodes, dense fp32
prefill). (bf16 and int8 differ: measured in docs/performance.md.)"""

from __future__ import annotations

import pytest
import torch

from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.engine.sampling_params import SamplingParams
from phiserve.host import pick_precision
from phiserve.models import cpu_kernels
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


def greedy_tokens(**load_kw) -> list[list[int]]:
    _, model, resolved = load_model(None, **load_kw)
    tok = Tokenizer.from_gguf(resolved.path)
    template = ChatTemplate(tok.chat_template, tok.bos_token or "", tok.eos_token or "")
    engine = LLMEngine(model, tok, EngineConfig(), torch.device("cpu"), torch.float32)
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(template.render([{"role": "user", "content": prompt}]))
        engine.add_request(str(i), ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return [out[str(i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("kernels", ["ours", "torch"])
def test_default_precision_greedy_equals_fp32_reference(kernels, monkeypatch):
    if kernels == "ours" and not cpu_kernels.available():
        pytest.skip("CPU kernels unavailable here")
    if kernels == "torch":
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    p = pick_precision("auto", torch.device("cpu"), is_gguf=True)
    assert p.keep_dense is (kernels == "torch")
    served = greedy_tokens(weight_format=p.weight_format, lm_head_format=p.lm_head_format, keep_dense=p.keep_dense)
    reference = greedy_tokens()
    assert all(len(t) == 32 for t in served)
    assert served == reference
