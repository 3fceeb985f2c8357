"""Usage ledger and prices: every finished choice is counted exactly once, in the engine thread."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from phiserve.engine.llm_engine import ChoiceOutput

MAX_TRACKED_USERS = 10_000  # distinct `user` values kept apart; later ones are pooled under OTHER_USERS
MAX_PENDING = 10_000  # registered requests not yet finished (a request that never starts must not leak)
OTHER_USERS = "(other)"

# USD per million tokens (input, output) of models whose hosted price is known.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {"microsoft/phi-4": (0.07, 0.14)}


@dataclass(frozen=True)
class Prices:
    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6

    @classmethod
    def for_model(cls, name: str, input_price: float | None = None, output_price: float | None = None) -> Prices:
        default_in, default_out = DEFAULT_PRICES.get(name, (0.0, 0.0))
        return cls(default_in if input_price is None else input_price, default_out if output_price is None else output_price)


def usage_dict(prompt_tokens: int, completion_tokens: int, prices: Prices, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "estimated_cost": round(prices.cost(prompt_tokens, completion_tokens), 10),
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class UsageLedger:
    def __init__(self, model_name: str, registry: CollectorRegistry) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.aborted = 0
        # OpenAI's `user` field: request id -> (user, choices still running), and totals per user.
        self._pending: OrderedDict[str, list] = OrderedDict()
        self._users: dict[str, dict[str, int]] = {}
        self._prompt = Counter("phiserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=registry)
        self._completion = Counter("phiserve_completion_tokens", "Completion tokens generated", ["model"], registry=registry)
        self._finished = Counter("phiserve_choices_finished", "Finished choices by reason", ["model", "reason"], registry=registry)

    def register(self, request_id: str, user: str | None, n: int) -> None:
        """Remember who sent a request (OpenAI's `user`) so its choices are also counted per user."""
        if not user:
            return
        with self._lock:
            self._pending[request_id] = [user, n]
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)

    def record(self, out: ChoiceOutput) -> None:
        """Called once per finished choice; the prompt is billed once per request (with choice 0)."""
        prompt = out.num_prompt_tokens if out.index == 0 else 0
        with self._lock:
            self.requests += out.index == 0
            self.prompt_tokens += prompt
            self.completion_tokens += out.num_output_tokens
            self.aborted += out.finish_reason == "abort"
            entry = self._pending.get(out.request_id)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._pending[out.request_id]
                name = entry[0] if entry[0] in self._users or len(self._users) < MAX_TRACKED_USERS else OTHER_USERS
                totals = self._users.setdefault(name, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
                totals["requests"] += out.index == 0
                totals["prompt_tokens"] += prompt
                totals["completion_tokens"] += out.num_output_tokens
        self._prompt.labels(self.model_name).inc(prompt)
        self._completion.labels(self.model_name).inc(out.num_output_tokens)
        self._finished.labels(self.model_name, out.finish_reason or "unknown").inc()

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "requests": self.requests,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "aborted_choices": self.aborted,
                "users": {name: dict(totals) for name, totals in self._users.items()},
            }
