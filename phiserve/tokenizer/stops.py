"""Which token ids end a generation, and a chat-template fallback for Phi-4-style vocabularies.

Checkpoints under-report their stop tokens. Phi-4's first release names only ``<|endoftext|>``
(100257) as EOS in config.json and tokenizer_config.json, yet every assistant turn ends with
``<|im_end|>`` (100265); stopping on EOS alone lets the model run on past the end of its turn.
So the stop set is the union of what every source says: config.json (or GGUF metadata),
generation_config.json, the tokenizer's eos_token, the end-of-turn tokens the chat template
writes, and ``<|endoftext|>`` when it is a special token (GPT-2-style document end).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from phiserve.tokenizer.chat_template import PHI4_CHAT_TEMPLATE, ChatTemplate
from phiserve.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DOCUMENT_END_TOKENS = ("<|endoftext|>",)
PHI4_MARKERS = ("<|im_start|>", "<|im_sep|>", "<|im_end|>")


def generation_config_eos_ids(folder: str | os.PathLike[str]) -> list[int]:
    """``eos_token_id`` of a Hugging Face folder's generation_config.json (int or list); [] if absent."""
    path = Path(folder) / "generation_config.json"
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []  # missing or unreadable: it only ever adds stop ids
    if isinstance(eos, int):
        return [eos]
    return [e for e in eos if isinstance(e, int)] if isinstance(eos, list) else []


def stop_token_ids(tokenizer: Tokenizer, template: ChatTemplate, eos_ids: Iterable[int] = ()) -> list[int]:
    """Sorted ids that finish a choice: ``eos_ids`` (config/GGUF/generation_config), the tokenizer's
    EOS, the template's end-of-turn tokens and a special ``<|endoftext|>``."""
    ids = {int(i) for i in eos_ids}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token in template.end_of_turn_tokens:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            ids.add(token_id)
    for token in DOCUMENT_END_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None and tokenizer.is_special(token_id):
            ids.add(token_id)
    return sorted(i for i in ids if 0 <= i < tokenizer.vocab_size)


def fallback_chat_template(tokenizer: Tokenizer) -> str | None:
    """Phi-4's template for a checkpoint that carries none but has Phi-4's turn markers (e.g. a GGUF
    converted without ``tokenizer.chat_template``); None when the vocabulary is not Phi-4's."""
    if all(tokenizer.token_to_id(t) is not None for t in PHI4_MARKERS):
        log.warning("no chat template in the checkpoint; using Phi-4's (its vocabulary has %s)", PHI4_MARKERS)
        return PHI4_CHAT_TEMPLATE
    return None
