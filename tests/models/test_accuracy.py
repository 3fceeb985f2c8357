"""Accuracy of the default (served) precision on the embedded model, the way llama.cpp validates its
quantized kernels: next-token distributions over a fixed text against a plain fp32 computation on the
dequantized GGUF weights. Both of the server's paths are measured: prefill rows (many rows a call) and
decode rows (packed int4 kernels, one token at a time through the KV cache)."""

from __future__ import annotations

import pytest
import torch

from phiserve.host import pick_precision
from phiserve.models.attention import AttentionMetadata
from phiserve.models.loader import load_model
from phiserve.tokenizer.tokenizer import Tokenizer

TEXT = (
    "The river town woke slowly on winter mornings. Before the sun cleared the hills, the baker had already "
    "lit his ovens, and the smell of fresh bread drifted down the narrow streets toward the harbor. Fishermen "
    "checked their nets by lantern light, talking quietly about the weather and the price of fuel. At the "
    "school on the corner, a teacher wrote the day's lesson on the board: the water cycle, with arrows "
    "pointing from the sea to the clouds and back again. Children arrived in twos and threes, their breath "
    "visible in the cold air, carrying books and lunches wrapped in paper. By nine o'clock the market square "
    "was full. Farmers sold apples, potatoes and cheese from wooden stalls, and an old man played the violin "
    "near the fountain, hoping for a few coins. The mayor walked through the crowd shaking hands, because an "
    "election was coming in the spring and every vote mattered. In the library, a student searched for a "
    "history of the town. She learned that it had been founded three hundred years earlier by merchants who "
    "traded wool and salt, that a great flood had destroyed the old bridge, and that the new bridge was built "
    "of stone so that it would never fall again. When the afternoon light faded, the lamps along the river "
    "were lit one by one, and the town settled into another quiet evening. Later that week a storm came in "
    "from the west. The harbor master raised the warning flags, and the boats stayed tied to the pier while "
    "waves broke over the sea wall. Shops closed early, and families gathered around their kitchen tables to "
    "play cards and listen to the radio, which reported fallen trees and flooded roads in the valley. By "
    "morning the wind had dropped, the sky was clear, and people came out to sweep the leaves from their steps."
)


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    ref_lp, lp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean().item()
    top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
    return kl, top1


@pytest.fixture(scope="module")
def setup():
    _, reference, resolved = load_model(None)  # fp32 weights dequantized from the file
    precision = pick_precision("auto", torch.device("cpu"), is_gguf=True)
    _, served, _ = load_model(
        None, weight_format=precision.weight_format, lm_head_format=precision.lm_head_format, keep_dense=precision.keep_dense
    )
    ids = torch.tensor(Tokenizer.from_gguf(resolved.path).encode(TEXT))
    assert len(ids) >= 300
    with torch.inference_mode():
        ref_logits = reference(ids, torch.arange(len(ids)))
    return served, ids, ref_logits


def test_default_precision_prefill_rows(setup):
    served, ids, ref_logits = setup
    with torch.inference_mode():
        logits = served(ids, torch.arange(len(ids)))  # every row a prefill row, all in one call
    kl, top1 = kl_and_top1(ref_logits, logits)
    print(f"prefill rows: KL {kl:.6f} top-1 {top1:.4f} over {len(ids)} tokens")
    assert kl <= 0.0015 and top1 >= 0.97


def test_default_precision_decode_rows(setup):
    served, ids, ref_logits = setup
    cfg = served.config
    n = len(ids)
    caches = [(torch.zeros(n, cfg.num_kv_heads, cfg.head_dim), torch.zeros(n, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
    rows = []
    with torch.inference_mode():
        for i in range(n):  # one decode row per step, attending over the cache like the server's decodes
            meta = AttentionMetadata.single_decode(i)
            rows.append(served(ids[i : i + 1], torch.tensor([i]), caches, meta, torch.tensor([0]), dense_rows=0)[0])
    kl, top1 = kl_and_top1(ref_logits, torch.stack(rows))
    print(f"decode rows: KL {kl:.6f} top-1 {top1:.4f} over {n} tokens")
    assert kl <= 0.0015 and top1 >= 0.97
