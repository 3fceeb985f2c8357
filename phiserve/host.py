"""Loads one served model (weights, tokenizer, chat template) and builds its engine (the caller runs it)."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry

from phiserve.api.usage import Prices, UsageLedger
from phiserve.engine.async_engine import AsyncEngine
from phiserve.engine.llm_engine import EngineConfig, LLMEngine
from phiserve.models import cpu_kernels
from phiserve.models.loader import load_model, resolve_model
from phiserve.tokenizer.chat_template import ChatTemplate
from phiserve.tokenizer.stops import fallback_chat_template, generation_config_eos_ids, stop_token_ids
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
    engine_on_caller_thread: bool = False  # the CLI loads the model and drives the engine from its main thread
    # EngineConfig fields the user left unset: on CUDA they get CUDA_ENGINE_DEFAULTS (on CPU the
    # EngineConfig defaults stand)
    engine_sized_by_device: frozenset[str] = frozenset()


# A GPU runs many more rows per step for about the cost of one, and holds far more cache than 0.5 GiB:
# defaults in vLLM's spirit (its gpu_memory_utilization is 0.9 of the whole card; ours is 0.9 of what
# is free once the weights are in, which leaves room for activations and CUDA graphs).
CUDA_ENGINE_DEFAULTS = {"max_num_batched_tokens": 2048, "max_num_seqs": 64}
CUDA_KV_CACHE_FRACTION = 0.9


def engine_config_for(options: ServeOptions, device: torch.device) -> EngineConfig:
    """The engine settings, the ones left unset sized for the device (call once the weights are loaded)."""
    unset = options.engine_sized_by_device
    if device.type != "cuda" or not unset:
        return options.engine
    sized = {name: value for name, value in CUDA_ENGINE_DEFAULTS.items() if name in unset}
    if "kv_cache_bytes" in unset:
        free, _ = torch.cuda.mem_get_info(device)
        sized["kv_cache_bytes"] = int(free * CUDA_KV_CACHE_FRACTION)
    return dataclasses.replace(options.engine, **sized)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    """How weights and activations are held; see docs/performance.md for the measurements behind auto."""

    act_dtype: torch.dtype  # residual stream, attention and KV cache
    weight_format: str | None  # linear.WEIGHT_FORMATS, None = keep the load dtype
    lm_head_format: str | None = None
    keep_dense: bool = False  # hybrid: dense weights for prefill rows beside packed ones for decodes


def pick_precision(name: str, device: torch.device, is_gguf: bool) -> Precision:
    if device.type != "cpu":
        if name in ("int8", "int4"):
            raise ValueError(f"--dtype {name} uses CPU kernels; on {device.type} use bfloat16 or float16")
        act = torch.float16 if name == "float16" else torch.float32 if name == "float32" else torch.bfloat16
        return Precision(act, None)
    if name == "auto":
        # GGUF Q4_1 layers map exactly onto int4. With our kernels every row takes the int16-activation
        # kernel (from 12 rows over weights unpacked panel by panel), so no dense copy is kept (-425 MiB
        # on the embedded model); with torch's kernels a dense fp32 copy serves prefill rows ("hybrid").
        # Output head "rescored": a fast copy ranks the vocabulary (our group-int8 kernel, exact for a
        # Q8_0 embedding; else bf16), the top 64 logits are recomputed in fp32. A plain fp32 head costs
        # ~16 ms a step here, a bf16 one rounds logits to ~3 digits (docs/performance.md).
        if not is_gguf:
            return Precision(torch.float32, None)
        return Precision(torch.float32, "int4", "rescored", keep_dense=not cpu_kernels.available())
    if name in ("int8", "int4"):
        return Precision(torch.float32, name, "bfloat16")
    if name in ("float32", "bfloat16", "float16"):
        return Precision(torch.float32, name)
    raise ValueError(f"unknown --dtype {name!r}: choose auto, float32, bfloat16, float16, int8 or int4")


def release_freed_memory() -> None:
    """Hand the heap freed by dequantization back to the OS (glibc keeps it otherwise: ~0.5 GB RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class ModelHost:
    def __init__(self, options: ServeOptions, registry: CollectorRegistry) -> None:
        if options.threads:
            torch.set_num_threads(options.threads)
        device = pick_device(options.device)
        source = resolve_model(options.model)
        precision = pick_precision(options.dtype, device, source.kind == "gguf")
        dtype = precision.act_dtype
        config, model, resolved = load_model(
            str(source.path), dtype=dtype, device=device, weight_format=precision.weight_format,
            lm_head_format=precision.lm_head_format, keep_dense=precision.keep_dense,
        )
        release_freed_memory()
        self.name = options.served_model_name or source.served_name
        self.tokenizer = Tokenizer.from_gguf(resolved.path) if resolved.kind == "gguf" else Tokenizer.from_hf_folder(resolved.path)
        template_source = self.tokenizer.chat_template or fallback_chat_template(self.tokenizer)
        if template_source is None:
            raise ValueError(f"{resolved.path} has no chat template")
        self.template = ChatTemplate(template_source, self.tokenizer.bos_token or "", self.tokenizer.eos_token or "")
        # Union of every source: Phi-4's files name only <|endoftext|>, its turns end with <|im_end|>.
        eos_ids = [*config.eos_token_ids, *(generation_config_eos_ids(resolved.path) if resolved.kind == "hf" else [])]
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.template, eos_ids)
        self.prices = Prices.for_model(self.name, options.input_price, options.output_price)
        self.ledger = UsageLedger(self.name, registry)
        llm = LLMEngine(model, self.tokenizer, engine_config_for(options, device), device, kv_dtype=dtype)
        self.max_model_len = llm.max_model_len
        self.grammars = llm.grammars  # the API validates grammars against the engine's tokenizer up front
        self.engine = AsyncEngine(llm, on_finish=self.ledger.record)
        log.info("serving %s from %s on %s (%s), context %d", self.name, resolved.path, device, precision, self.max_model_len)

    def shutdown(self) -> None:
        self.engine.stop()
