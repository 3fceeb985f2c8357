"""Loads one served model (weights, tokenizer, chat template) and starts its engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry

from phiserve.api.usage import Prices, UsageLedger
from phiserve.engine.async_engine import AsyncEngine
from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.models.loader import load_model
from phiserve.tokenizer.chat_template import ChatTemplate
from phiserve.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    model: str | None = None  # None = the embedded default
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    threads: int | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    input_price: float | None = None  # USD per million tokens
    output_price: float | None = None
    api_key: str | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelHost:
    def __init__(self, options: ServeOptions, registry: CollectorRegistry) -> None:
        if options.threads:
            torch.set_num_threads(options.threads)
        device = pick_device(options.device)
        dtype = pick_dtype(options.dtype, device)
        config, model, resolved = load_model(options.model, dtype=dtype, device=device)
        self.name = options.served_model_name or resolved.served_name
        self.tokenizer = Tokenizer.from_gguf(resolved.path) if resolved.kind == "gguf" else Tokenizer.from_hf_folder(resolved.path)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{resolved.path} has no chat template")
        self.template = ChatTemplate(self.tokenizer.chat_template, self.tokenizer.bos_token or "", self.tokenizer.eos_token or "")
        stop_ids = set(config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            stop_ids.add(self.tokenizer.eos_token_id)
        for token in self.template.end_of_turn_tokens:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                stop_ids.add(token_id)
        self.stop_token_ids = sorted(stop_ids)
        self.prices = Prices.for_model(self.name, options.input_price, options.output_price)
        self.ledger = UsageLedger(self.name, registry)
        llm = LLMEngine(model, self.tokenizer, options.engine, device, kv_dtype=dtype)
        self.max_model_len = llm.max_model_len
        self.engine = AsyncEngine(llm, options.threads, on_finish=self.ledger.record)
        self.engine.start()
        log.info("serving %s from %s on %s (%s), context %d", self.name, resolved.path, device, dtype, self.max_model_len)

    def shutdown(self) -> None:
        self.engine.stop()
