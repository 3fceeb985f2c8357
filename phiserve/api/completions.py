"""POST /v1/completions: a raw prompt, no chat template (used by the benchmark so templates cannot differ)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from phiserve.api.chat import sse
from phiserve.api.errors import OpenAIError
from phiserve.api.generation import (
    check_model,
    new_id,
    now,
    request_usage,
    run_until_disconnect,
    sampling_params,
)
from phiserve.api.protocol import CompletionRequest
from phiserve.api.usage import usage_dict
from phiserve.engine.llm_engine import ChoiceOutput
from phiserve.host import ModelHost


async def create_completion(req: CompletionRequest, request: Request, host: ModelHost) -> JSONResponse | StreamingResponse:
    check_model(req, host)
    prompt_ids = host.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    if not prompt_ids:
        raise OpenAIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    if any(not 0 <= t < host.tokenizer.vocab_size for t in prompt_ids):
        raise OpenAIError(400, "The prompt contains token ids outside the vocabulary.", param="prompt", code="invalid_value")
    params = sampling_params(req, host, len(prompt_ids), req.requested_max_tokens, False, 0)
    request_id = new_id("cmpl")
    host.ledger.register(request_id, req.user, req.n)  # OpenAI's `user`: kept in the usage ledger
    outputs = host.engine.generate(request_id, prompt_ids, params, req.n)
    if req.stream:
        return StreamingResponse(_stream(req, host, request_id, outputs), media_type="text/event-stream")
    results = await run_until_disconnect(request, outputs)
    texts = [""] * req.n
    finals: dict[int, ChoiceOutput] = {}
    for out in results:
        texts[out.index] += out.text
        if out.finish_reason is not None:
            finals[out.index] = out
    return JSONResponse(
        {
            "id": request_id,
            "object": "text_completion",
            "created": now(),
            "model": host.name,
            "choices": [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finals[i].finish_reason} for i in range(req.n)],
            "usage": request_usage(finals, host),
        }
    )


async def _stream(req: CompletionRequest, host: ModelHost, request_id: str, outputs: AsyncIterator[ChoiceOutput]) -> AsyncIterator[str]:
    created = now()
    completion_tokens = [0] * req.n
    remaining = req.n
    try:
        async for out in outputs:
            completion_tokens[out.index] = out.num_output_tokens
            usage = None
            if out.finish_reason is not None:
                remaining -= 1
                if remaining == 0:
                    usage = usage_dict(out.num_prompt_tokens, sum(completion_tokens), host.prices, out.num_cached_tokens)
            if out.text or out.finish_reason is not None:
                choice = {"index": out.index, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
                yield sse({"id": request_id, "object": "text_completion", "created": created, "model": host.name, "choices": [choice], "usage": usage})
        yield sse("[DONE]")
    finally:
        await outputs.aclose()
