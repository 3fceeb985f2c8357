"""What /v1/chat/completions and /v1/completions share: model check, context check, sampling params,
and running a request on the engine while watching for the client to go away."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from phiserve.api.errors import OpenAIError
from phiserve.api.protocol import SamplingFields
from phiserve.api.usage import usage_dict
from phiserve.engine.llm_engine import ChoiceOutput
from phiserve.engine.sampler import TokenLogprob
from phiserve.engine.sampling_params import SamplingParams
from phiserve.host import ModelHost


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def check_model(req: SamplingFields, host: ModelHost) -> None:
    if req.model != host.name:
        raise OpenAIError(404, f"The model `{req.model}` does not exist or you do not have access to it.", param="model", code="model_not_found")


def sampling_params(req: SamplingFields, host: ModelHost, prompt_len: int, requested_max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
    limit = host.max_model_len
    if requested_max_tokens is None:
        max_tokens = limit - prompt_len
        if max_tokens <= 0:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your messages resulted in {prompt_len} tokens. "
                "Please reduce the length of the messages.",
                param="messages",
                code="context_length_exceeded",
            )
    else:
        max_tokens = requested_max_tokens
        if prompt_len + max_tokens > limit:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested {prompt_len + max_tokens} tokens "
                f"({prompt_len} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        token_id = int(key)
        if not 0 <= token_id < host.tokenizer.vocab_size:
            raise OpenAIError(400, f"Invalid key in 'logit_bias': {key} is not a token id of this model.", param="logit_bias", code="invalid_value")
        bias[token_id] = value
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=bias,
        seed=req.seed,
        max_tokens=max_tokens,
        stop=req.stop_list,
        stop_token_ids=host.stop_token_ids,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


async def run_until_disconnect(request: Request, outputs: AsyncIterator[ChoiceOutput]) -> list[ChoiceOutput]:
    """Collect a non-streamed request's outputs; if the client disconnects first, abort it at once."""

    async def collect() -> list[ChoiceOutput]:
        return [out async for out in outputs]

    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    collector = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(disconnected())
    done, _ = await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if collector not in done:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        await outputs.aclose()
        raise asyncio.CancelledError("client disconnected")
    return collector.result()


def token_logprob_entry(host: ModelHost, lp: TokenLogprob) -> dict:
    """OpenAI's logprobs.content[] entry for one sampled token."""

    def entry(token_id: int, logprob: float) -> dict:
        raw = host.tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top_logprobs]}


def request_usage(finals: dict[int, ChoiceOutput], host: ModelHost) -> dict:
    """`usage` of a finished request: the prompt counted once, the completion tokens of every choice."""
    first = finals[0]
    return usage_dict(first.num_prompt_tokens, sum(f.num_output_tokens for f in finals.values()), host.prices, first.num_cached_tokens)
