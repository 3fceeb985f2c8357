"""Async bridge: the engine loop runs on one thread (``run_forever``); each request awaits its own output queue.

Requests and aborts cross into the engine thread through a locked inbox, applied between steps, so
the engine itself is single-threaded. A request whose consumer goes away (client disconnect) is
aborted within one step and its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from phiserve.engine.llm_engine import ChoiceOutput, LLMEngine
from phiserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Pending:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    n: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_finish: Callable[[ChoiceOutput], None] | None = None) -> None:
        self.engine = engine
        self.on_finish = on_finish  # usage accounting hook, called in the engine thread for every finished choice
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[_Pending] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Pending] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, ChoiceOutput]]] = {}  # see _flush
        self._stopped = False
        self.error: BaseException | None = None

    def stop(self) -> None:
        """Ask the loop to return after its current step (from any thread)."""
        self._stopped = True
        self._wake.set()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1) -> AsyncIterator[ChoiceOutput]:
        """Yield every choice's deltas until all n choices have finished. Cancelling the consumer aborts the request."""
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        pending = _Pending(request_id, prompt_token_ids, params, n, asyncio.Queue(), asyncio.get_running_loop())
        with self._lock:
            self._inbox.append(pending)
        self._wake.set()
        remaining = n
        try:
            while remaining:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(str(item))
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            if remaining:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    # ---- engine thread --------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Run the engine loop on the calling thread until stop(). Call it on the thread that loaded the
        model (see AppState.load_and_run): torch's OpenMP pool belongs to the calling thread."""
        try:
            while not self._stopped:
                self._drain_inbox()
                if not self.engine.has_work():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
                self._flush()
        except BaseException as exc:  # a real fault: fail every waiting request, keep the reason for /health
            log.exception("engine loop died")
            self.error = exc
            for pending in list(self._streams.values()):
                pending.loop.call_soon_threadsafe(pending.queue.put_nowait, exc)

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for pending in inbox:
            self._streams[pending.request_id] = pending
            for out in self.engine.add_request(pending.request_id, pending.prompt_token_ids, pending.params, pending.n):
                self._deliver(out)
        for request_id in aborts:
            choices = self.engine.abort(request_id)
            self._streams.pop(request_id, None)
            for out in choices:
                self._account(out)
        self._flush()

    def _deliver(self, out: ChoiceOutput) -> None:
        pending = self._streams.get(out.request_id)
        if out.finish_reason is not None:
            self._account(out)
        if pending is None:
            return
        self._outbox.setdefault(pending.loop, []).append((pending.queue, out))
        if out.finish_reason is not None:
            pending.n -= 1
            if pending.n == 0:
                del self._streams[out.request_id]

    def _flush(self) -> None:
        """Hand this step's outputs to their event loops: one wake-up per loop and step, not one per
        output (16 streams made 16 self-pipe writes and loop wake-ups a step)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _account(self, out: ChoiceOutput) -> None:
        if self.on_finish is not None:
            self.on_finish(out)


def _put_all(items: list[tuple[asyncio.Queue, ChoiceOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
