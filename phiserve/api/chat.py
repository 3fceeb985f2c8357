"""POST /v1/chat/completions: messages -> chat template -> token ids -> engine -> response or SSE."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from phiserve.api.chat_tools import ChatPlan, ChoiceShaper, plan_chat
from phiserve.api.errors import OpenAIError
from phiserve.api.generation import (
    check_model,
    new_id,
    now,
    request_usage,
    run_until_disconnect,
    sampling_params,
    token_logprob_entry,
)
from phiserve.api.protocol import ChatCompletionRequest
from phiserve.api.usage import usage_dict
from phiserve.engine.llm_engine import ChoiceOutput
from phiserve.host import ModelHost
from phiserve.tokenizer.chat_template import TemplateError


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": m.text})
    return out


def render_prompt(req: ChatCompletionRequest, host: ModelHost) -> list[int]:
    try:
        text = host.template.render(template_messages(req), add_generation_prompt=True)
    except TemplateError as exc:
        raise OpenAIError(400, f"The chat template rejected the messages: {exc}", param="messages") from exc
    return host.tokenizer.encode(text)


async def create_chat_completion(req: ChatCompletionRequest, request: Request, host: ModelHost) -> JSONResponse | StreamingResponse:
    check_model(req, host)
    if req.top_logprobs and not req.logprobs:
        raise OpenAIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs", code="invalid_value")
    plan = await plan_chat(req, host)  # tools, tool_choice, response_format (api/chat_tools.py)
    prompt_ids = render_prompt(req, host) if plan.prompt is None else host.tokenizer.encode(plan.prompt)
    params = sampling_params(req, host, len(prompt_ids), req.requested_max_tokens, req.logprobs, req.top_logprobs or 0)
    params.grammar = plan.grammar
    request_id = new_id("chatcmpl")
    host.ledger.register(request_id, req.user, req.n)  # OpenAI's `user`: kept in the usage ledger
    outputs = host.engine.generate(request_id, prompt_ids, params, req.n)
    if req.stream:
        return StreamingResponse(_stream(req, host, request_id, outputs, len(prompt_ids), plan), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = await run_until_disconnect(request, outputs)
    return JSONResponse(_response(req, host, request_id, results, plan))


def _response(req: ChatCompletionRequest, host: ModelHost, request_id: str, results: list[ChoiceOutput], plan: ChatPlan | None = None) -> dict:
    # Fed delta by delta exactly as when streaming, so both give the same message.
    shapers: list[ChoiceShaper] = [(plan or ChatPlan()).shaper() for _ in range(req.n)]
    logprobs: list[list[dict]] = [[] for _ in range(req.n)]
    finals: dict[int, ChoiceOutput] = {}
    for out in results:
        shapers[out.index].feed(out.text)
        logprobs[out.index].extend(token_logprob_entry(host, lp) for lp in out.logprobs)
        if out.finish_reason is not None:
            finals[out.index] = out
            shapers[out.index].finish()
    choices = []
    for i in range(req.n):
        choices.append(
            {
                "index": i,
                "message": shapers[i].message(),
                "logprobs": {"content": logprobs[i], "refusal": None} if req.logprobs else None,
                "finish_reason": shapers[i].finish_reason(finals[i].finish_reason),
            }
        )
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": now(),
        "model": host.name,
        "choices": choices,
        "usage": request_usage(finals, host),
        "system_fingerprint": None,
    }


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(req: ChatCompletionRequest, host: ModelHost, request_id: str, outputs: AsyncIterator[ChoiceOutput], prompt_len: int, plan: ChatPlan | None = None) -> AsyncIterator[str]:
    created = now()
    shapers = [(plan or ChatPlan()).shaper() for _ in range(req.n)]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    completion_tokens = [0] * req.n
    prompt_tokens = prompt_len  # known before the first token, so continuous usage is right from the role chunk
    cached_tokens = 0
    remaining = req.n

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: list[dict] | None = None, usage: dict | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None, "finish_reason": finish_reason}
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": host.name, "system_fingerprint": None, "choices": [choice], "usage": usage})

    def usage() -> dict:
        return usage_dict(prompt_tokens, sum(completion_tokens), host.prices, cached_tokens)

    try:
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": (plan or ChatPlan()).initial_content}, usage=usage() if continuous else None)
        async for out in outputs:
            prompt_tokens, cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
            completion_tokens[out.index] = out.num_output_tokens
            logprobs = [token_logprob_entry(host, lp) for lp in out.logprobs] if req.logprobs and out.logprobs else None
            shaper = shapers[out.index]
            deltas = shaper.feed(out.text) + (shaper.finish() if out.finish_reason is not None else [])
            if logprobs and not deltas:
                deltas = [{}]  # held-back text (a possible tool call) still reports its tokens' logprobs
            for k, delta in enumerate(deltas):
                yield chunk(out.index, delta, logprobs=logprobs if k == 0 else None, usage=usage() if continuous else None)
            if out.finish_reason is not None:
                remaining -= 1
                # Like the hosted provider, the last chunk with a finish_reason carries usage.
                yield chunk(out.index, {}, shaper.finish_reason(out.finish_reason), usage=usage() if (remaining == 0 or continuous) else None)
        if include_usage:
            yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": host.name, "system_fingerprint": None, "choices": [], "usage": usage()})
        yield sse("[DONE]")
    finally:
        await outputs.aclose()
