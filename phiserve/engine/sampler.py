"""Batched next-token sampling with per-sequence penalty state and per-sequence RNGs.

Every sequence owns a preallocated row slot holding:
  * token counts of its generated tokens (OpenAI presence/frequency penalties),
  * a seen-mask of its prompt + generated tokens (Hugging Face repetition_penalty),
  * its sampling parameters as one row of a parameter table, and
  * its own torch.Generator.
The count and seen rows are updated incrementally from each sampled token, so a step costs
O(B * V) no matter how long the sequences are. Slots are reset when handed out, so remove() is O(1).

Processing order (one batched tensor pass, each stage skipped when no row uses it):
  allowed_mask -> logit_bias -> repetition_penalty -> presence/frequency -> temperature
  -> top-k -> top-p -> min-p -> inverse-CDF draw (greedy rows take the argmax after penalties).
Each row's random number comes from that row's generator, and each stage is an exact no-op on a
row whose parameter is neutral, so a seeded request gets the same tokens whatever else is batched.

Logprobs are the log-softmax of the RAW model logits (as vLLM reports by default and as OpenAI
describes them: the model's distribution), not of the penalised/filtered distribution.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from phiserve.engine.sampling_params import SamplingParams
from phiserve.models import cpu_kernels

_U64_MASK = (1 << 64) - 1
_NEG_INF = float("-inf")

# Columns of the per-slot float parameter table.
_TEMP, _TOP_P, _TOP_K, _MIN_P, _PRESENCE, _FREQUENCY, _REPETITION = range(7)
_NUM_COLS = 7
_TOP_P_CANDIDATES = 1024  # head of the distribution examined for top-p before falling back to a full sort
# sample(): rows with top-k or top-p draw within their most likely tokens, wider slices when needed
_CANDIDATE_WIDTHS = (64, _TOP_P_CANDIDATES)  # topk(64) of 49k x 16 rows: ~1 ms here, topk(1024) ~5


@dataclass
class TokenLogprob:
    """Logprob of the chosen token and the top alternatives, from the raw model distribution."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask for logprobs


@dataclass(frozen=True)
class _SlotInfo:
    """Python-side flags of one slot, so fast paths are chosen without reading device tensors."""

    greedy: bool
    bias: bool
    repetition: bool
    penalties: bool
    temperature: bool
    top_k: bool
    top_p: bool
    min_p: bool
    logprobs: bool
    top_logprobs: int


class Sampler:
    def __init__(self, vocab_size: int, max_num_seqs: int, device: torch.device | str = "cpu") -> None:
        if vocab_size <= 0 or max_num_seqs <= 0:
            raise ValueError("vocab_size and max_num_seqs must be positive")
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.device = torch.device(device)
        n, v, dev = max_num_seqs, vocab_size, self.device
        self._counts = torch.zeros(n, v, dtype=torch.int32, device=dev)
        self._seen = torch.zeros(n, v, dtype=torch.bool, device=dev)
        self._table = torch.zeros(n, _NUM_COLS, dtype=torch.float32, device=dev)
        # logit_bias is sparse (OpenAI allows a few hundred entries), so keep it as (ids, values) per slot.
        self._bias: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        self._info: list[_SlotInfo | None] = [None] * n
        # CPU generators: each row draws one scalar per step, so there is nothing to gain on a GPU.
        self._generators = [torch.Generator() for _ in range(n)]
        self._slot_of: dict[int, int] = {}
        self._free = list(range(n - 1, -1, -1))  # pop() hands out the lowest slot first

    # ---- slots ----------------------------------------------------------------------------------
    def has(self, seq_id: int) -> bool:
        return seq_id in self._slot_of

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def add(self, seq_id: int, params: SamplingParams, prompt_ids: list[int]) -> None:
        """Give seq_id a slot, reset its state to the prompt and (re)seed its generator."""
        if seq_id in self._slot_of:
            raise ValueError(f"sequence {seq_id} already has a sampler slot")
        if not self._free:
            raise RuntimeError(f"all {self.max_num_seqs} sampler slots are in use")
        v = self.vocab_size
        # Validate before taking the slot so a bad request cannot leak one.
        if params.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if params.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if params.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if any(not 0 <= t < v for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {v})")
        if any(not 0 <= t < v for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {v})")

        slot = self._free.pop()
        dev = self.device
        self._counts[slot].zero_()
        self._seen[slot].zero_()
        if prompt_ids:
            self._seen[slot, torch.tensor(prompt_ids, dtype=torch.long, device=dev)] = True
        row = [0.0] * _NUM_COLS
        row[_TEMP] = params.temperature
        row[_TOP_P] = params.top_p
        row[_TOP_K] = float(params.top_k)
        row[_MIN_P] = params.min_p
        row[_PRESENCE] = params.presence_penalty
        row[_FREQUENCY] = params.frequency_penalty
        row[_REPETITION] = params.repetition_penalty
        self._table[slot] = torch.tensor(row, dtype=torch.float32, device=dev)  # one copy, not seven
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long, device=dev)
            vals = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=dev)
            self._bias[slot] = (ids, vals)
        else:
            self._bias[slot] = None
        greedy = params.temperature == 0.0
        self._info[slot] = _SlotInfo(
            greedy=greedy,
            bias=bool(params.logit_bias),
            repetition=params.repetition_penalty != 1.0,
            penalties=params.presence_penalty != 0.0 or params.frequency_penalty != 0.0,
            temperature=not greedy and params.temperature != 1.0,
            top_k=0 < params.top_k < v,
            top_p=params.top_p < 1.0,
            min_p=params.min_p > 0.0,
            logprobs=params.logprobs,
            top_logprobs=max(0, min(params.top_logprobs, v)) if params.logprobs else 0,
        )
        # Unseeded requests get fresh OS randomness; seeded ones are reproducible.
        seed = params.seed & _U64_MASK if params.seed is not None else secrets.randbits(64)
        self._generators[slot].manual_seed(seed)
        self._slot_of[seq_id] = slot

    def remove(self, seq_id: int) -> None:
        """Free the slot in O(1); its tensors are reset when the slot is handed out again."""
        slot = self._slot_of.pop(seq_id)
        self._info[slot] = None
        self._bias[slot] = None
        self._free.append(slot)

    def record_tokens(self, seq_id: int, token_ids: list[int]) -> None:
        """Add tokens that joined the output without being sampled here (e.g. forced by a grammar)."""
        if not token_ids:
            return
        slot = self._slot_of[seq_id]
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        ones = torch.ones(len(token_ids), dtype=torch.int32, device=self.device)
        self._counts[slot].index_put_((ids,), ones, accumulate=True)
        self._seen[slot, ids] = True

    # ---- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def process_logits(
        self, logits: torch.Tensor, seq_ids: list[int], allowed_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The [B, vocab] float32 logits that sample() draws from (softmax gives the probabilities).

        Removed tokens are -inf. Greedy rows are returned after penalties but without temperature.
        State is not changed; useful for tests and for verifying draft tokens.
        """
        slots, infos = self._lookup(seq_ids)
        x, table, _ = self._penalise(logits, slots, infos, allowed_mask)
        return x if all(info.greedy for info in infos) else self._truncate(x, table, infos)

    @torch.no_grad()
    def sample(
        self, logits: torch.Tensor, seq_ids: list[int], allowed_mask: torch.Tensor | None = None
    ) -> SamplerOutput:
        """Pick one token per row and update each sequence's penalty state with it."""
        slots, infos = self._lookup(seq_ids)
        x, table, greedy_tokens = self._penalise(logits, slots, infos, allowed_mask)
        tokens = greedy_tokens if greedy_tokens is not None else torch.zeros(len(infos), dtype=torch.long, device=self.device)
        drawn = [i for i, info in enumerate(infos) if not info.greedy]
        if drawn:
            # One uniform per drawn row from that row's own (CPU) generator; greedy rows draw
            # nothing, so their generator state is untouched.
            u = {i: torch.rand((), generator=self._generators[slots[i]]).item() for i in drawn}
            rows = [i for i in drawn if infos[i].top_k or infos[i].top_p]
            for width in _CANDIDATE_WIDTHS:
                if rows and width < self.vocab_size:
                    rows = self._draw_candidates(x, table, rows, u, width, tokens)
            # no top-k/top-p, or survivors reaching past every slice: filter and draw over the whole row
            full = sorted({i for i in drawn if not (infos[i].top_k or infos[i].top_p)} | set(rows))
            if full:
                rows_t = torch.tensor(full, dtype=torch.long, device=self.device)
                xs = self._truncate(x.index_select(0, rows_t), table.index_select(0, rows_t), [infos[i] for i in full])
                tokens[rows_t] = self._draw(torch.softmax(xs, dim=-1), [u[i] for i in full])

        slots_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        self._counts.index_put_(
            (slots_t, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True
        )
        self._seen[slots_t, tokens] = True

        token_list: list[int] = tokens.tolist()
        return SamplerOutput(token_list, self._logprobs(logits, infos, tokens, token_list))

    # ---- internals ------------------------------------------------------------------------------
    def _lookup(self, seq_ids: list[int]) -> tuple[list[int], list[_SlotInfo]]:
        try:
            slots = [self._slot_of[s] for s in seq_ids]
        except KeyError as e:
            raise KeyError(f"sequence {e.args[0]} has no sampler slot; call add() first") from None
        infos: list[_SlotInfo] = []
        for slot in slots:
            info = self._info[slot]
            assert info is not None  # occupied slots always carry their info
            infos.append(info)
        return slots, infos

    def _penalise(
        self,
        logits: torch.Tensor,
        slots: list[int],
        infos: list[_SlotInfo],
        allowed_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The stages up to temperature: (x, the rows' parameter table, the greedy rows' argmax or None)."""
        v = self.vocab_size
        if logits.dim() != 2 or logits.shape[0] != len(slots) or logits.shape[1] < v:
            raise ValueError(f"logits must be [{len(slots)}, >= {v}], got {tuple(logits.shape)}")
        # Padded vocab columns (if any) are never sampled. Always copy: the stages work in place.
        x = logits[:, :v].to(device=self.device, dtype=torch.float32, copy=True)
        slots_t = torch.tensor(slots, dtype=torch.long, device=self.device)
        table = self._table.index_select(0, slots_t)

        if allowed_mask is not None:
            allowed = allowed_mask[:, :v].to(device=self.device, dtype=torch.bool)
            if not bool(allowed.any(dim=-1).all()):
                raise ValueError("allowed_mask has a row that allows no token")
            x.masked_fill_(~allowed, _NEG_INF)

        if any(info.bias for info in infos):
            rows, ids, vals = [], [], []
            for i, slot in enumerate(slots):
                entry = self._bias[slot]
                if entry is not None:
                    rows.append(torch.full_like(entry[0], i))
                    ids.append(entry[0])
                    vals.append(entry[1])
            x.index_put_((torch.cat(rows), torch.cat(ids)), torch.cat(vals), accumulate=True)

        if any(info.repetition for info in infos):
            seen = self._seen.index_select(0, slots_t)
            rep = table[:, _REPETITION : _REPETITION + 1]
            # HF semantics: shrink positive logits, push negative ones further down.
            penalised = torch.where(x > 0, x / rep, x * rep)
            x = torch.where(seen, penalised, x)

        if any(info.penalties for info in infos):
            counts = self._counts.index_select(0, slots_t).to(torch.float32)
            presence = table[:, _PRESENCE : _PRESENCE + 1]
            frequency = table[:, _FREQUENCY : _FREQUENCY + 1]
            x -= presence * (counts > 0) + frequency * counts

        greedy_tokens = x.argmax(dim=-1) if any(info.greedy for info in infos) else None
        if any(info.temperature for info in infos):
            temp = table[:, _TEMP]
            # Greedy rows divide by 1: their token is the argmax taken above.
            x /= torch.where(temp == 0, torch.ones_like(temp), temp).unsqueeze(1)
        return x, table, greedy_tokens

    def _truncate(self, x: torch.Tensor, table: torch.Tensor, infos: list[_SlotInfo]) -> torch.Tensor:
        """top-k, top-p and min-p over whole rows; removed tokens become -inf."""
        use_k = any(info.top_k for info in infos)
        use_p = any(info.top_p for info in infos)
        if use_k or use_p:
            x = self._top_k_top_p(x, table, use_k, use_p)
        if any(info.min_p for info in infos):
            probs = torch.softmax(x, dim=-1)
            threshold = table[:, _MIN_P : _MIN_P + 1] * probs.amax(dim=-1, keepdim=True)
            x.masked_fill_(probs < threshold, _NEG_INF)  # min_p = 0 gives threshold 0: removes nothing
        return x

    def _draw(self, probs: torch.Tensor, u: list[float]) -> torch.Tensor:
        """Inverse-CDF sampling with ONE uniform per row: the first token whose cumulative probability
        exceeds u * total. Unlike an exponential race / Gumbel-max it needs no V-sized noise and no V
        transcendental calls (measured ~8 ms per 100k-vocab row for exponential_ on the 2-core CPU box
        vs well under 1 ms here)."""
        # float64 cumsum: float32 would drift by ~1e-5 over a 100k vocab and bias the tail.
        cdf = probs.cumsum(dim=-1, dtype=torch.float64)
        # u is a float32 draw (< 1 - 2**-24), so target < total strictly and the index is < V;
        # the first index whose cdf exceeds target is a strict rise, so never a zero-probability token.
        target = torch.tensor(u, dtype=torch.float64, device=probs.device).unsqueeze(1) * cdf[:, -1:]
        index = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return index.clamp_(max=probs.shape[1] - 1)

    def _draw_candidates(
        self, x: torch.Tensor, table: torch.Tensor, rows: list[int], u: dict[int, float], width: int, tokens: torch.Tensor
    ) -> list[int]:
        """Filter and draw `rows` (top-k and/or top-p set) within each row's `width` most likely
        tokens: no full-vocabulary pass after the topk (a 16-row step spent ~20 ms in the
        full-vocabulary stages on the 2-core box). Writes the drawn tokens into `tokens`; returns the
        rows whose survivors may reach past the slice, for a wider slice or the whole-row path.

        The survivors are _truncate's: top-k and top-p cut at a logit value (ties kept), top-p mass
        normalised over the row's top-k survivors, min-p over the survivors; the draw walks them in
        token-id order as _draw does over a whole row. `width` is a constant, never the batch's, so
        a row's token does not depend on what else is batched.
        """
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        whole_batch = len(rows) == x.shape[0]  # rows ascend: then they are all of x, no copy needed
        xs, tbl = (x, table) if whole_batch else (x.index_select(0, rows_t), table.index_select(0, rows_t))
        draw = self._candidate_picks_kernel if cpu_kernels.usable(xs) else self._candidate_picks
        picked, done = draw(xs, tbl, [u[i] for i in rows], width)
        if all(done):
            tokens[rows_t] = picked
            return []
        take = torch.tensor([j for j, ok in enumerate(done) if ok], dtype=torch.long, device=self.device)
        tokens[rows_t[take]] = picked[take]
        return [row for row, ok in zip(rows, done, strict=True) if not ok]

    def _candidate_picks(self, xs: torch.Tensor, tbl: torch.Tensor, u: list[float], width: int) -> tuple[torch.Tensor, list[bool]]:
        """The torch stages of _draw_candidates: each row's drawn token, and whether it is final."""
        v = self.vocab_size
        vals, ids = torch.topk(xs, width, dim=-1)  # descending
        k = tbl[:, _TOP_K : _TOP_K + 1].long()
        k_on = (k > 0) & (k < v)
        kth = vals.gather(1, torch.where(k_on, k, width).clamp(max=width) - 1)
        keep = vals >= kth
        # every token >= the k-th value is in the slice iff the slice ends below that value
        k_inside = k_on & (vals[:, -1:] < kth)
        top_p = tbl[:, _TOP_P : _TOP_P + 1]
        p_on = top_p < 1.0
        resolved = k_inside & ~p_on
        if bool(p_on.any()):
            # the top-p mass is over the row's top-k survivors: those in the slice, or the whole row
            whole = torch.logsumexp(xs, dim=-1, keepdim=True) if bool((p_on & ~k_on).any()) else 0.0
            lse = torch.where(k_inside, torch.logsumexp(vals.masked_fill(~keep, _NEG_INF), dim=-1, keepdim=True), whole)
            probs = torch.exp(vals - lse).masked_fill_(~keep, 0.0)
            cum = probs.cumsum(dim=-1)
            n_keep = ((cum - probs) < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
            cut = vals.gather(1, n_keep - 1)
            keep &= (vals >= cut) | ~p_on
            nucleus_inside = (cum[:, -1:] >= top_p) & (vals[:, -1:] < cut)
            resolved |= p_on & (k_inside | (~k_on & nucleus_inside))
        masked = vals.masked_fill(~keep, _NEG_INF)
        probs = torch.softmax(masked, dim=-1)
        keep &= probs >= tbl[:, _MIN_P : _MIN_P + 1] * probs[:, :1]  # the first is the most likely; min_p 0 keeps all
        # survivors in token-id order; removed ones sort last with zero probability
        sorted_ids, order = ids.masked_fill(~keep, v).sort(dim=-1)
        probs = torch.softmax(masked.masked_fill_(~keep, _NEG_INF), dim=-1).gather(1, order)
        picked = sorted_ids.gather(1, self._draw(probs, u).unsqueeze(1)).squeeze(1)
        return picked, resolved.squeeze(1).tolist()

    def _candidate_picks_kernel(self, xs: torch.Tensor, tbl: torch.Tensor, u: list[float], width: int) -> tuple[torch.Tensor, list[bool]]:
        """The same in one call of our CPU kernel: one selection scan per row instead of torch.topk
        and ~60 small torch ops (which took ~1 ms a row here)."""
        top_k, top_p = tbl[:, _TOP_K].long(), tbl[:, _TOP_P]
        k_on = (top_k > 0) & (top_k < self.vocab_size)
        whole = (top_p < 1.0) & ~k_on  # their top-p mass is over the whole row
        row_lse = torch.logsumexp(xs, dim=-1) if bool(whole.any()) else torch.zeros(len(u))
        picked = torch.ops.phiserve.sample_candidates(
            xs.contiguous(), top_k, top_p, tbl[:, _MIN_P], torch.tensor(u, dtype=torch.float64), row_lse, width,
        )  # fmt: skip
        return picked, (picked >= 0).tolist()

    def _top_k_top_p(self, x: torch.Tensor, table: torch.Tensor, use_k: bool, use_p: bool) -> torch.Tensor:
        # Both filters need only the head of each row's sorted distribution, so take a top-K slice
        # instead of sorting the whole vocab (a full 100k sort is ~10x slower than topk(1024) on
        # CPU). If a top-p row's nucleus does not fit in the slice, retry with the full vocab.
        # Both filters cut at a logit value, so tokens tied with the last kept one are kept (as HF
        # does for top-k) and the result does not depend on the slice size or sort stability.
        v = self.vocab_size
        k = table[:, _TOP_K].long()
        k_on = (k > 0) & (k < v)
        num = min(v, max(_TOP_P_CANDIDATES if use_p else 1, int(k.max()) if use_k else 1))
        while True:
            vals, _ = torch.topk(x, num, dim=-1)  # descending
            remove = torch.zeros_like(x, dtype=torch.bool)
            if use_k:
                kth = vals.gather(1, (k.clamp(1, num) - 1).unsqueeze(1))
                remove_k = k_on.unsqueeze(1)
                remove |= (x < kth) & remove_k
                vals = vals.masked_fill((vals < kth) & remove_k, _NEG_INF)
            if not use_p:
                return x.masked_fill_(remove, _NEG_INF)
            top_p = table[:, _TOP_P : _TOP_P + 1]
            p_on = top_p < 1.0  # top_p >= 1 rows are exempt so cumsum rounding never bites them
            # Probabilities of the slice under the full (top-k filtered) row's normaliser.
            lse = torch.logsumexp(x.masked_fill(remove, _NEG_INF), dim=-1, keepdim=True)
            probs = torch.exp(vals - lse)
            cum = probs.cumsum(dim=-1)
            if num < v and not bool(((cum[:, -1:] >= top_p) | ~p_on).all()):
                num = v  # some nucleus reaches past the slice
                continue
            # Keep a token while the strictly more likely tokens hold < top_p of the mass: the
            # smallest set reaching top_p; the most likely token always survives.
            n_keep = ((cum - probs) < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)
            cut = vals.gather(1, n_keep - 1)
            remove |= (x < cut) & p_on
            return x.masked_fill_(remove, _NEG_INF)

    def _logprobs(
        self, logits: torch.Tensor, infos: list[_SlotInfo], tokens: torch.Tensor, token_list: list[int]
    ) -> list[TokenLogprob | None]:
        out: list[TokenLogprob | None] = [None] * len(infos)
        rows = [i for i, info in enumerate(infos) if info.logprobs]
        if not rows:
            return out
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        raw = logits[:, : self.vocab_size].to(device=self.device).index_select(0, rows_t)
        lp = torch.log_softmax(raw.to(torch.float32), dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, rows_t).unsqueeze(1)).squeeze(1).tolist()
        k = max(infos[i].top_logprobs for i in rows)
        top_vals: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if k > 0:
            vals_t, ids_t = torch.topk(lp, k, dim=-1)
            top_vals, top_ids = vals_t.tolist(), ids_t.tolist()
        for j, i in enumerate(rows):
            n = infos[i].top_logprobs
            top = list(zip(top_ids[j][:n], top_vals[j][:n], strict=True))
            out[i] = TokenLogprob(token_list[i], chosen[j], top)
        return out
