"""What a request asks of generation, validated upstream by the API layer (ranges live in api/protocol.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # Hugging Face semantics, over prompt + generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # model's EOS / end-of-turn ids
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # llguidance grammar (engine/grammar.py) the output must match; None = unconstrained.
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
