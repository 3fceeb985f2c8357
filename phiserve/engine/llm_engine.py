"""The synchronous engine: schedule -> run -> sample -> detokenize/stop, one step at a time.

It knows nothing of HTTP: requests come in as token ids and SamplingParams, outputs go out as
per-choice deltas (text, token ids, logprobs, finish reason).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from phiserve.engine.grammar import GrammarBackend, GrammarMatcher, batch_mask
from phiserve.engine.kv_cache import BlockManager
from phiserve.engine.runner import ModelRunner, kv_bytes_per_token
from phiserve.engine.sampler import Sampler, TokenLogprob
from phiserve.engine.sampling_params import SamplingParams
from phiserve.engine.scheduler import ScheduledBatch, Scheduler
from phiserve.engine.sequence import Sequence, SequenceStatus
from phiserve.engine.stop_checker import StopChecker
from phiserve.models.attention import kv_cache_dtype
from phiserve.models.decoder import Decoder
from phiserve.tokenizer.detokenizer import IncrementalDetokenizer
from phiserve.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SEED_MIX = 0x9E3779B97F4A7C15  # spreads per-choice seeds of one request apart


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 32
    max_model_len: int | None = None  # defaults to the model's context length, capped by the pool
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # on a CUDA device, replay decode-only steps as CUDA graphs


@dataclass
class ChoiceOutput:
    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


@dataclass
class _Choice:
    request_id: str
    index: int
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    matcher: GrammarMatcher | None = None  # set when the request carries a grammar


class LLMEngine:
    def __init__(self, model: Decoder, tokenizer: Tokenizer, config: EngineConfig, device: torch.device, kv_dtype: torch.dtype) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        kv_dtype = kv_cache_dtype(kv_dtype, device)
        per_token = kv_bytes_per_token(model, kv_dtype)
        num_blocks = max(1, config.kv_cache_bytes // (per_token * config.block_size))
        pool_tokens = num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or model.config.max_position_embeddings, pool_tokens)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs)
        graphs_for = (config.max_num_seqs, self.max_model_len) if config.cuda_graphs else None
        self.runner = ModelRunner(model, num_blocks, config.block_size, kv_dtype, device, cuda_graphs_for=graphs_for)
        self.sampler = Sampler(model.config.vocab_size, config.max_num_seqs * 2 + 16, device)
        self._choices: dict[int, _Choice] = {}  # seq_id -> choice
        self._requests: dict[str, list[_Choice]] = {}
        self.grammars = GrammarBackend(tokenizer, model.config.vocab_size)
        self._num_constrained = 0  # live choices with a matcher; 0 means steps skip grammar work entirely

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1) -> list[ChoiceOutput]:
        """Queue n choices of one prompt. Returns outputs for choices finished at once (max_tokens=0)."""
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id}")
        choices, finished = [], []
        leader = None
        for index in range(n):
            p = params if index == 0 or params.seed is None else dataclasses.replace(params, seed=(params.seed * SEED_MIX + index) % 2**63)
            seq = Sequence(prompt_token_ids, p, leader=leader)
            leader = leader or seq
            choice = _Choice(request_id, index, seq, IncrementalDetokenizer(self.tokenizer), StopChecker(p.stop), frozenset(() if p.ignore_eos else p.stop_token_ids))
            choices.append(choice)
            if p.max_tokens == 0:
                seq.finish_reason = "length"
                seq.status = SequenceStatus.FINISHED
                finished.append(self._output(choice, "", [], []))
                continue
            if p.grammar is not None:
                choice.matcher = self.grammars.matcher(p.grammar)
                if choice.matcher.error:  # the API validates grammars first, so this is a safety net
                    log.error("request %s: grammar rejected: %s", request_id, choice.matcher.error)
                    seq.finish_reason = "stop"
                    seq.status = SequenceStatus.FINISHED
                    finished.append(self._output(choice, "", [], []))
                    continue
                self._num_constrained += 1
            self._choices[seq.seq_id] = choice
            self.scheduler.add(seq)
        if len(finished) < n:
            self._requests[request_id] = [c for c in choices if not c.seq.is_finished]
        return finished

    def abort(self, request_id: str) -> list[ChoiceOutput]:
        """Finish every unfinished choice of a request now; returns their final outputs (for usage accounting)."""
        outputs = []
        for choice in self._requests.pop(request_id, []):
            self._release(choice, "abort")
            outputs.append(self._output(choice, "", [], []))
        return outputs

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[ChoiceOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        masks = self._start_masks(batch) if self._num_constrained else None  # overlaps the forward pass
        logits, sampling = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.register_computed(seq)
        if not sampling:
            return []
        for seq in sampling:  # sampler state is taken at first sample, so waiting requests hold no slot
            if not self.sampler.has(seq.seq_id):
                self.sampler.add(seq.seq_id, seq.params, seq.token_ids[: seq.num_prompt_tokens])
        sampled = self.sampler.sample(logits, [s.seq_id for s in sampling], allowed_mask=self._allowed_mask(masks, sampling))
        outputs = []
        for seq, token, logprob in zip(sampling, sampled.token_ids, sampled.logprobs, strict=True):
            outputs.append(self._append_token(self._choices[seq.seq_id], token, logprob))
        return outputs

    def _append_token(self, choice: _Choice, token: int, logprob: TokenLogprob | None) -> ChoiceOutput:
        seq = choice.seq
        seq.token_ids.append(token)
        reason = None
        text = ""
        forced: list[int] = []
        if token in choice.stop_token_ids:
            reason, logprob = "stop", None  # the end-of-turn token is not part of the answer
        else:
            text, stopped = choice.stop_checker.feed(choice.detokenizer.push(token))
            if stopped:
                reason = "stop"
            elif choice.matcher is not None:
                if not choice.matcher.advance(token) or choice.matcher.is_done:
                    reason = "stop"  # the grammar is complete (or, never expected, broken): nothing may follow
                else:
                    forced, forced_text, reason = self._fast_forward(choice)
                    text += forced_text
        if reason is None and (seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None and not choice.stop_checker.stopped:
            # Length or end-of-turn: release text held back as a possible stop-string start.
            text += choice.stop_checker.feed(choice.detokenizer.flush())[0] + choice.stop_checker.flush()
        out = self._output(choice, text, [token, *forced], [logprob] if logprob is not None else [])
        if reason is not None:
            self._release(choice, reason)
            out.finish_reason = reason
            remaining = [c for c in self._requests.get(choice.request_id, []) if c is not choice]
            if remaining:
                self._requests[choice.request_id] = remaining
            else:
                self._requests.pop(choice.request_id, None)
        return out

    def _fast_forward(self, choice: _Choice) -> tuple[list[int], str, str | None]:
        """Append the tokens the grammar forces next (e.g. `{"name": "f", "arguments": `) without
        sampling them: the next step computes them as one chunk instead of one step per token.

        Returns the tokens, their text and a finish reason. Skipped when logprobs are requested,
        since every output token must then carry one.
        """
        seq, matcher = choice.seq, choice.matcher
        if matcher is None or seq.params.logprobs:
            return [], "", None
        budget = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)
        forced: list[int] = []
        text = ""
        reason = None
        for token in matcher.forced_tokens()[: max(0, budget)]:
            if token in choice.stop_token_ids or not matcher.advance(token):
                break
            seq.token_ids.append(token)
            forced.append(token)
            piece, stopped = choice.stop_checker.feed(choice.detokenizer.push(token))
            text += piece
            if stopped:
                reason = "stop"
                break
        if forced:
            self.sampler.record_tokens(seq.seq_id, forced)  # penalties see forced tokens too
        if reason is None and matcher.is_done:
            reason = "stop"
        return forced, text, reason

    def _start_masks(self, batch: ScheduledBatch) -> tuple[list[int], Future[torch.Tensor]] | None:
        """Start the allowed-token masks of this step's constrained sampling rows (those whose last
        token is computed this step); returns their seq ids and the future of their masks."""
        seq_ids: list[int] = []
        rows: list[tuple[GrammarMatcher, frozenset[int]]] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            choice = self._choices[seq.seq_id]
            if choice.matcher is not None and seq.num_computed_tokens + n == seq.num_tokens:
                seq_ids.append(seq.seq_id)
                rows.append((choice.matcher, choice.stop_token_ids))
        return (seq_ids, self.grammars.submit_masks(rows)) if rows else None

    @staticmethod
    def _allowed_mask(pending: tuple[list[int], Future[torch.Tensor]] | None, sampling: list[Sequence]) -> torch.Tensor | None:
        if pending is None:
            return None
        seq_ids, future = pending
        row_of = {seq.seq_id: row for row, seq in enumerate(sampling)}
        return batch_mask(len(sampling), future.result(), [row_of[s] for s in seq_ids])

    def _release(self, choice: _Choice, reason: str) -> None:
        if choice.matcher is not None:
            choice.matcher = None
            self._num_constrained -= 1
        self.scheduler.finish(choice.seq, reason)
        self._choices.pop(choice.seq.seq_id, None)
        if self.sampler.has(choice.seq.seq_id):
            self.sampler.remove(choice.seq.seq_id)

    def _output(self, choice: _Choice, text: str, token_ids: list[int], logprobs: list[TokenLogprob]) -> ChoiceOutput:
        seq = choice.seq
        return ChoiceOutput(
            choice.request_id, choice.index, text, token_ids, logprobs, seq.finish_reason,
            seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens,
        )

    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": bm.prefix_hits,
            "max_model_len": self.max_model_len,
            "block_size": bm.block_size,
            "cuda_graph_steps": self.runner.graph_steps,
        }
