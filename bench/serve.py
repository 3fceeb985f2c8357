"""Serving benchmark: phiserve vs an OpenAI-compatible baseline (llama-cpp-python by default).

One server runs at a time on loopback, both on the same GGUF file. Each is driven with identical
seeded /v1/completions requests (raw prompt strings, so no chat template can differ) whose output
length is fixed: the end tokens get logit_bias -100 and max_tokens caps the rest. Runs alternate
baseline/ours `--repeats` times; the summary reports medians, spread and ratios (> 1: ours better).

    .venv/bin/python bench/serve.py --quick --baseline-python bench/.venv/bin/python

See docs/performance.md ("Benchmark: phiserve vs llama.cpp") for the metric definitions.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"

OURS_CMD = ".venv/bin/phiserve serve --host 127.0.0.1 --port {port}"
BASELINE_CMD = (
    "{python} -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port} --n_ctx {n_ctx}"
    " --n_threads 2 --n_threads_batch 2 --interrupt_requests False"
)

# SmolLM2: <|endoftext|>, <|im_start|>, <|im_end|>. Banned so every request runs to max_tokens.
END_TOKEN_IDS = (0, 1, 2)

# Sampling sent explicitly to both servers so neither falls back to its own defaults
# (llama-cpp-python's repeat_penalty default is not 1.0, for one).
SAMPLING = {
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}

WORDS = (
    "the of and to in is was that for on with as by at from his her they this which but have had not are "
    "were been one all their there when would what about more some time only other into after year over "
    "people also new first two could these may work most made between city world state water river house "
    "school family history small large early later under during against along around before several many "
    "system number part place music book road country government company report market village bridge "
    "mountain island forest garden station letter paper window morning evening summer winter spring north "
    "south east west little great long high old young local public national common simple different "
    "important possible open close find give take bring carry follow build write read learn teach begin "
    "travel return decide remember explain describe consider develop produce receive provide remain become "
    "because although while until since however therefore often always never usually quickly slowly "
    "quietly carefully together again already still perhaps almost nearly enough rather quite very"
).split()

# What each metric's ratio means: higher-is-better metrics ratio = ours / baseline, lower-is-better = baseline / ours.
HIGHER_BETTER = {"output_tok_s"}
LOWER_BETTER = {"ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "peak_rss_mib", "startup_s", "ttft_first_ms", "cached_ttft_pct"}

_live: list[subprocess.Popen] = []  # servers to kill on any exit


# ---------------------------------------------------------------- prompts


class PromptMaker:
    """Deterministic English-like text cut to an exact token count with the model's own tokenizer
    (the GGUF's vocabulary, the same one both servers use). Without it, one word ~ one token."""

    def __init__(self, model: Path) -> None:
        self.tok: Any = None
        try:
            from phiserve.tokenizer.tokenizer import Tokenizer

            self.tok = Tokenizer.from_gguf(model)
        except Exception as e:  # the benchmark still runs, prompt lengths are then approximate
            print(f"[bench] tokenizer unavailable ({e}); prompt lengths are approximate", file=sys.stderr)

    @staticmethod
    def _words(rng: random.Random, n: int) -> str:
        out: list[str] = []
        sentence = 0
        for _ in range(n):
            w = rng.choice(WORDS)
            out.append(w.capitalize() if sentence == 0 else w)
            sentence += 1
            if sentence > 6 and rng.random() < 0.15:
                out[-1] += rng.choice((".", ".", ".", ",", ";", "?"))
                sentence = 0 if out[-1][-1] in ".?" else sentence
        return " ".join(out)

    def text(self, seed: int, n_tokens: int) -> str:
        rng = random.Random(seed)
        if self.tok is None:
            return self._words(rng, n_tokens)
        text = self._words(rng, n_tokens + 16)
        ids = self.tok.encode(text)
        while len(ids) < n_tokens:
            text += " " + self._words(rng, n_tokens)
            ids = self.tok.encode(text)
        return self.tok.decode(ids[:n_tokens]).rstrip()

    def count(self, text: str) -> int | None:
        return len(self.tok.encode(text)) if self.tok is not None else None


# ---------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    description: str
    prompts: list[str]
    max_tokens: int
    concurrency: int
    seed: int  # request i gets seed + i


def build_workloads(pm: PromptMaker, quick: bool, selected: set[str]) -> list[Workload]:
    out_tokens = 64 if quick else 128
    wl: list[Workload] = []
    # Seeds of the text generator differ per workload and per request: no two prompts share a
    # prefix by accident (prefix caches), except W3's deliberate shared prefix.
    if "W1" in selected:
        n = 3 if quick else 8
        wl.append(
            Workload(
                "W1",
                f"1 user, 128 in / {out_tokens} out",
                [pm.text(1000 + i, 128) for i in range(n)],
                out_tokens,
                1,
                1,
            )
        )
    if "W2" in selected:
        for conc, n_quick, n_full in ((1, 8, 16), (4, 8, 32), (16, 16, 64)):
            n = n_quick if quick else n_full
            rng = random.Random(2000 + conc)
            lens = [rng.randint(64, 512) for _ in range(n)]
            wl.append(
                Workload(
                    f"W2-c{conc}",
                    f"concurrency {conc}, {n} requests, 64-512 in / {out_tokens} out",
                    [pm.text(20000 + 1000 * conc + i, k) for i, k in enumerate(lens)],
                    out_tokens,
                    conc,
                    2000 + 100 * conc,
                )
            )
    if "W3" in selected:
        n = 16 if quick else 32
        prefix = pm.text(3000, 1000)
        suffixes = [pm.text(3100 + i, 32) for i in range(n)]
        wl.append(
            Workload(
                "W3",
                f"{n} requests sharing a 1000-token prefix (+32 own), concurrency 4, {out_tokens} out",
                [prefix + " " + s for s in suffixes],
                out_tokens,
                4,
                3000,
            )
        )
    if "W3" in selected:
        # The issue's prefix-cache target: one request cold, then the same 1,000-token prefix again
        # (a different 32-token tail), one at a time, so TTFT is the prefill alone, no queueing.
        prefix = pm.text(3500, 1000)
        wl.append(
            Workload(
                "W3-pair",
                f"a new 1000-token prefix (+32 own) cold, then cached, sequential, {out_tokens} out",
                [prefix + " " + pm.text(3600 + i, 32) for i in range(2)],
                out_tokens,
                1,
                3500,
            )
        )
    if "W4" in selected:
        n = 1 if quick else 3
        wl.append(
            Workload(
                "W4",
                f"{n} x one 1536-token prompt, {out_tokens} out",
                [pm.text(4000 + i, 1536) for i in range(n)],
                out_tokens,
                1,
                4000,
            )
        )
    return wl


# ---------------------------------------------------------------- server process


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
    except OSError:
        pass
    return kids


def tree_rss_kib(pid: int) -> int:
    """VmRSS of the process and all its descendants, in KiB (0 when it is gone)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
        todo.extend(_children(p))
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0  # over the whole server life
        self.window = 0  # since the last reset_window()
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            kib = tree_rss_kib(self.pid)
            self.peak = max(self.peak, kib)
            self.window = max(self.window, kib)
            self._stop_evt.wait(self.interval)

    def reset_window(self) -> None:
        self.window = tree_rss_kib(self.pid)

    def stop(self) -> None:
        self._stop_evt.set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # whatever is left of the group, the leader included
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    if proc in _live:
        _live.remove(proc)


def _kill_all() -> None:
    for proc in list(_live):
        kill_tree(proc, grace=3.0)


def expand(cmd: str, **values: Any) -> list[str]:
    for key, value in values.items():
        cmd = cmd.replace("{" + key + "}", str(value))
    return shlex.split(cmd)


def wait_ready(proc: subprocess.Popen, base: str, timeout: float) -> float | None:
    """Seconds from now until /health answers 200 or /v1/models does; None if never."""

    async def poll() -> float | None:
        t0 = time.perf_counter()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while time.perf_counter() - t0 < timeout:
                if proc.poll() is not None:
                    return None
                for path in ("/health", "/v1/models"):
                    try:
                        async with session.get(base + path) as resp:
                            if resp.status == 200:
                                return time.perf_counter() - t0
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                await asyncio.sleep(0.05)
        return None

    return run_async(poll())


# ---------------------------------------------------------------- client


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int | None = None
    tokens: int = 0
    chunks: int = 0
    ttft: float | None = None  # seconds
    tpot: float | None = None  # seconds
    latency: float | None = None
    finish_reason: str | None = None
    token_source: str = ""
    error: str | None = None


# The load generator shares the two cores with the server under test, so it must cost little: aiohttp
# (C HTTP parser) on uvloop spends ~100 us of CPU per streamed event here, httpx on asyncio ~340 us
# (~2.8 s of a full c16 run's 8,192 events, taken from whichever server is being measured).
async def one_request(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    finish = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                text = (await resp.read()).decode(errors="replace")
                return RequestResult(False, error=f"HTTP {resp.status}: {text[:300]}")
            async for line in resp.content:  # one SSE line at a time
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                if not payload:
                    continue
                data = json.loads(payload)
                if data.get("error"):
                    return RequestResult(False, error=f"stream error: {json.dumps(data['error'])[:300]}")
                now = time.perf_counter()
                if data.get("usage"):
                    usage = data["usage"]
                for choice in data.get("choices") or []:
                    if choice.get("text"):
                        chunks += 1
                        if first is None:
                            first = now
                        last = now
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                        if first is not None:
                            last = now
    except Exception as e:  # timeouts, resets, bad JSON: a failed request, never a failed run
        return RequestResult(False, chunks=chunks, error=f"{type(e).__name__}: {e}"[:300])
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, error="no text in the stream", finish_reason=finish, latency=end - t0)
    if usage and usage.get("completion_tokens"):
        tokens, source = int(usage["completion_tokens"]), "usage"
    elif finish == "length":
        tokens, source = int(body["max_tokens"]), "max_tokens"  # ran to the cap: exactly max_tokens
    else:
        tokens, source = chunks, "chunks"
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return RequestResult(
        True,
        prompt_tokens=(usage or {}).get("prompt_tokens"),
        tokens=tokens,
        chunks=chunks,
        ttft=first - t0,
        tpot=tpot,
        latency=end - t0,
        finish_reason=finish,
        token_source=source,
    )


def client_session(concurrency: int, timeout: float) -> aiohttp.ClientSession:
    # A fresh connection per request: llama-server closes a kept-alive connection after a streamed
    # response, and a client reusing it then fails the next request ("Can not write request body").
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency + 2, force_close=True),
        timeout=aiohttp.ClientTimeout(total=timeout, connect=30.0),
    )


def run_async(coro: Any) -> Any:
    """asyncio.run on uvloop where it is installed (a cheaper event loop for the client)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def request_body(model: str, prompt: str, max_tokens: int, seed: int, temperature: float) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "seed": seed,
        "temperature": temperature,
        "logit_bias": {str(t): -100 for t in END_TOKEN_IDS},
        **SAMPLING,
    }


def pct(values: list[float], q: float) -> float | None:
    """Percentile with linear interpolation (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


async def run_workload(base: str, model_name: str, wl: Workload, temperature: float, timeout: float) -> dict:
    url = base + "/v1/completions"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(wl.prompts)):
        queue.put_nowait(i)
    results: list[RequestResult | None] = [None] * len(wl.prompts)
    async with client_session(wl.concurrency, timeout) as session:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = request_body(model_name, wl.prompts[i], wl.max_tokens, wl.seed + i, temperature)
                results[i] = await one_request(session, url, body)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(wl.concurrency)))
        wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    good = [r for r in done if r.ok]
    ttfts = [r.ttft for r in good if r.ttft is not None]
    tpots = [r.tpot for r in good if r.tpot is not None]
    return {
        "requests": len(done),
        "failed": len(done) - len(good),
        "short": sum(r.tokens < wl.max_tokens for r in good),  # fewer tokens than asked: length not fixed
        "wall_s": wall,
        "output_tokens": sum(r.tokens for r in good),
        "output_tok_s": sum(r.tokens for r in good) / wall if wall > 0 else None,
        "ttft_p50_ms": _ms(pct(ttfts, 50)),
        "ttft_p99_ms": _ms(pct(ttfts, 99)),
        # first request vs the rest: for W3-pair, a cold prefix vs the same prefix cached
        "ttft_first_ms": _ms(results[0].ttft) if results[0] is not None and results[0].ok else None,
        "cached_ttft_pct": _cached_pct(results),
        "tpot_p50_ms": _ms(pct(tpots, 50)),
        "tpot_p99_ms": _ms(pct(tpots, 99)),
        "token_sources": sorted({r.token_source for r in good}),
        "errors": sorted({r.error for r in done if r.error})[:5],
        "per_request": [asdict(r) for r in done],
    }


def _cached_pct(results: list[RequestResult | None]) -> float | None:
    """TTFT of the later requests (median) as a percentage of the first one's."""
    first = results[0]
    rest = [r.ttft for r in results[1:] if r is not None and r.ok and r.ttft is not None]
    if first is None or not first.ok or not first.ttft or not rest:
        return None
    return 100.0 * statistics.median(rest) / first.ttft


# ---------------------------------------------------------------- one run = one server life


@dataclass
class Run:
    server: str  # "ours" | "baseline"
    repeat: int
    argv: list[str] = field(default_factory=list)
    startup_s: float | None = None
    peak_rss_mib: float | None = None
    error: str | None = None
    log: str = ""
    workloads: dict[str, dict] = field(default_factory=dict)


def run_server(
    server: str, repeat: int, cmd: str, args: argparse.Namespace, workloads: list[Workload], log_dir: Path
) -> Run:
    port = free_port()
    argv = expand(cmd, port=port, model=args.model, python=args.baseline_python, n_ctx=args.n_ctx)
    log_path = log_dir / f"{server}-r{repeat}.log"
    run = Run(server, repeat, argv, log=str(log_path))
    base = f"http://{HOST}:{port}"
    print(f"[bench] {server} run {repeat}: {shlex.join(argv)}", file=sys.stderr)
    with open(log_path, "wb") as log:
        try:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            run.error = f"could not start: {e}"
            print(f"[bench]   {run.error}", file=sys.stderr)
            return run
        _live.append(proc)
        sampler = RssSampler(proc.pid)
        sampler.start()
        try:
            ready = wait_ready(proc, base, args.startup_timeout)
            if ready is None:
                run.error = (
                    f"not ready after {args.startup_timeout:.0f}s"
                    if proc.poll() is None
                    else f"exited with code {proc.returncode} before ready"
                )
                print(f"[bench]   {run.error} (log: {log_path})", file=sys.stderr)
                return run
            run.startup_s = time.perf_counter() - t0
            print(f"[bench]   ready in {run.startup_s:.1f}s", file=sys.stderr)
            model_name = served_name(base)
            # Warm-up, not measured: first-call costs (lazy init, allocator growth) are not serving speed.
            warm = Workload("warmup", "", [PromptMaker._words(random.Random(99), 16)], 8, 1, 99)
            run_async(run_workload(base, model_name, warm, args.temperature, args.request_timeout))
            for wl in workloads:
                sampler.reset_window()
                try:
                    res = run_async(
                        run_workload(base, model_name, wl, args.temperature, args.request_timeout)
                    )
                except Exception as e:  # a workload that breaks still leaves the others
                    res = {
                        "requests": len(wl.prompts),
                        "failed": len(wl.prompts),
                        "error": f"{type(e).__name__}: {e}",
                    }
                res["peak_rss_mib"] = sampler.window / 1024.0
                run.workloads[wl.name] = res
                line = _fmt_line(res)
                print(f"[bench]   {wl.name:7s} {line}", file=sys.stderr)
                if proc.poll() is not None:
                    run.error = f"server exited with code {proc.returncode} during {wl.name}"
                    print(f"[bench]   {run.error}", file=sys.stderr)
                    break
        finally:
            sampler.stop()
            kill_tree(proc)
            sampler.join(1.0)
            run.peak_rss_mib = sampler.peak / 1024.0 if sampler.peak else None
    return run


def served_name(base: str) -> str:
    async def get() -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0)) as session:
            async with session.get(base + "/v1/models") as resp:
                return json.loads(await resp.read())["data"][0]["id"]

    try:
        return run_async(get())
    except Exception:
        return "default"


def _fmt_line(res: dict) -> str:
    def f(key: str, spec: str) -> str:
        v = res.get(key)
        return "-" if v is None else format(v, spec)

    return (
        f"{f('output_tok_s', '.1f')} tok/s  TTFT p50 {f('ttft_p50_ms', '.0f')} ms  TPOT p50 {f('tpot_p50_ms', '.1f')} ms  "
        f"failed {res.get('failed', '-')}/{res.get('requests', '-')}  short {res.get('short', '-')}  "
        f"rss {f('peak_rss_mib', '.0f')} MiB"
    )


# ---------------------------------------------------------------- summary


def summarize(runs: list[Run], workloads: list[Workload]) -> list[dict]:
    rows: list[dict] = []

    def values(server: str, get: Any) -> list[float]:
        out = []
        for r in runs:
            if r.server == server:
                v = get(r)
                if v is not None:
                    out.append(float(v))
        return out

    def add(workload: str, metric: str, get: Any) -> None:
        row: dict[str, Any] = {"workload": workload, "metric": metric}
        for server in ("baseline", "ours"):
            vs = values(server, get)
            med = statistics.median(vs) if vs else None
            row[server] = {
                "median": med,
                "min": min(vs) if vs else None,
                "max": max(vs) if vs else None,
                "n": len(vs),
                "spread_pct": (max(vs) - min(vs)) / med * 100.0 if vs and med else None,
                "values": vs,
            }
        b, o = row["baseline"]["median"], row["ours"]["median"]
        ratio = None
        if b is not None and o is not None:
            if metric in HIGHER_BETTER and b > 0:
                ratio = o / b
            elif metric in LOWER_BETTER and o > 0:
                ratio = b / o
        row["ratio"] = ratio
        rows.append(row)

    metrics = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "failed")
    for wl in workloads:
        for m in metrics:
            add(wl.name, m, lambda r, w=wl.name, m=m: r.workloads.get(w, {}).get(m))
        add(wl.name, "peak_rss_mib", lambda r, w=wl.name: r.workloads.get(w, {}).get("peak_rss_mib"))
        if wl.name == "W3-pair":
            for m in ("ttft_first_ms", "cached_ttft_pct"):
                add(wl.name, m, lambda r, w=wl.name, m=m: r.workloads.get(w, {}).get(m))
    add("server", "startup_s", lambda r: r.startup_s)
    add("server", "peak_rss_mib", lambda r: r.peak_rss_mib)
    add("server", "failed_runs", lambda r: 1 if r.error else 0)
    return rows


def markdown(rows: list[dict]) -> str:
    def num(v: float | None, metric: str = "") -> str:
        if v is None:
            return "-"
        if metric.startswith("failed"):  # counts: the median of whole numbers
            return f"{v:g}"
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"

    def spread(cell: dict, metric: str) -> str:
        if metric.startswith("failed"):
            return "-" if cell["max"] is None else f"max {cell['max']:g}"
        return "-" if cell["spread_pct"] is None else f"{cell['spread_pct']:.0f}%"

    lines = [
        "| workload | metric | baseline median | ours median | ratio (>1: ours better) | spread (baseline / ours) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(
            f"| {r['workload']} | {r['metric']} | {num(r['baseline']['median'], r['metric'])} | {num(r['ours']['median'], r['metric'])} | {ratio} | "
            f"{spread(r['baseline'], r['metric'])} / {spread(r['ours'], r['metric'])} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def versions(args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        from importlib.metadata import version

        out["phiserve"] = version("phiserve")
        out["torch"] = version("torch")
    except Exception:
        pass
    try:
        v = subprocess.run(
            [args.baseline_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if v.returncode == 0:
            out["llama_cpp_python"] = v.stdout.strip()
    except Exception:
        pass
    return out


def default_model() -> str:
    try:
        from phiserve.models.loader import resolve_model

        return str(resolve_model(None).path)
    except Exception as e:
        sys.exit(f"no --model given and the embedded model was not found: {e}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--model", help="GGUF file both servers load (default: the embedded SmolLM2-135M-Instruct Q4_1)"
    )
    ap.add_argument(
        "--ours-cmd", default=OURS_CMD, help="our server; placeholders {port} {model}; run from the repo root"
    )
    ap.add_argument(
        "--baseline-cmd",
        default=BASELINE_CMD,
        help="any OpenAI-compatible server; placeholders {port} {model} {python} {n_ctx}, "
        "e.g. 'llama-server -m {model} --port {port} -np 16 -c 65536 -t 2'",
    )
    default_py = ROOT / "bench" / ".venv" / "bin" / "python"
    ap.add_argument(
        "--baseline-python",
        default=str(default_py) if default_py.exists() else sys.executable,
        help="interpreter with llama-cpp-python[server] for the default --baseline-cmd",
    )
    ap.add_argument("--n-ctx", type=int, default=4096, help="context of the default baseline command")
    ap.add_argument("--repeats", type=int, default=3, help="baseline/ours pairs, alternated")
    ap.add_argument(
        "--quick", action="store_true", help="fewer requests and 64 output tokens (about 10 minutes)"
    )
    ap.add_argument("--only", choices=("ours", "baseline"), help="run one server only")
    ap.add_argument(
        "--workloads",
        default="W1,W2,W3,W4",
        help="comma-separated subset of W1,W2,W3,W4, or single workloads such as W2-c16, W3-pair",
    )
    ap.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature (seeded per request)"
    )
    ap.add_argument("--request-timeout", type=float, default=900.0, help="seconds per request")
    ap.add_argument(
        "--startup-timeout", type=float, default=300.0, help="seconds to wait for /health or /v1/models"
    )
    ap.add_argument("--out", help="JSON results (default bench/results/<timestamp>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    atexit.register(_kill_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so finally-blocks kill the server
    args.model = str(Path(args.model).resolve()) if args.model else default_model()
    # A family (W2) selects all its workloads; a full name (W2-c16) selects one.
    selected = {w.strip().upper() for w in args.workloads.split(",") if w.strip()}
    families = {name.split("-")[0] for name in selected}
    unknown = families - {"W1", "W2", "W3", "W4"}
    if unknown:
        sys.exit(f"unknown workloads: {', '.join(sorted(unknown))}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.with_suffix("")
    log_dir.mkdir(parents=True, exist_ok=True)

    pm = PromptMaker(Path(args.model))
    workloads = [
        w
        for w in build_workloads(pm, args.quick, families)
        if w.name.upper() in selected or w.name.split("-")[0].upper() in selected
    ]
    missing = selected - families - {w.name.upper() for w in workloads}
    if missing:
        sys.exit(f"unknown workloads: {', '.join(sorted(missing))}")
    order = ["baseline", "ours"] if args.only is None else [args.only]
    cmds = {"ours": args.ours_cmd, "baseline": args.baseline_cmd}
    print(
        f"[bench] model {args.model}; workloads {', '.join(w.name for w in workloads)}; "
        f"{args.repeats} x {'/'.join(order)}; logs in {log_dir}",
        file=sys.stderr,
    )

    runs: list[Run] = []
    result: dict[str, Any] = {}

    def save() -> None:
        result.update(
            {
                "started": stamp,
                "args": vars(args),
                "versions": versions(args) if "versions" not in result else result["versions"],
                "sampling": {
                    "temperature": args.temperature,
                    **SAMPLING,
                    "logit_bias": {str(t): -100 for t in END_TOKEN_IDS},
                },
                "workloads": [
                    {
                        "name": w.name,
                        "description": w.description,
                        "requests": len(w.prompts),
                        "concurrency": w.concurrency,
                        "max_tokens": w.max_tokens,
                        "prompt_tokens": [pm.count(p) for p in w.prompts],
                    }
                    for w in workloads
                ],
                "runs": [asdict(r) for r in runs],
                "summary": summarize(runs, workloads),
            }
        )
        out.write_text(json.dumps(result, indent=1))

    interrupted = False
    try:
        for repeat in range(1, args.repeats + 1):
            for server in order:
                runs.append(run_server(server, repeat, cmds[server], args, workloads, log_dir))
                save()
    except KeyboardInterrupt:
        interrupted = True
        print("[bench] interrupted: summarizing the runs so far", file=sys.stderr)
    finally:
        _kill_all()
    save()
    print(f"\n## phiserve vs baseline ({'quick' if args.quick else 'full'}, {args.repeats} repeat(s))\n")
    for w in workloads:
        print(f"- {w.name}: {w.description}")
    print()
    print(markdown(result["summary"]))
    print(f"\nresults: {out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
