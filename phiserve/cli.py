"""Command line: `phiserve serve [--model M] [--host H] [--port P] [--served-model-name NAME] ...`."""

from __future__ import annotations

import logging
import signal
import threading

import typer
import uvicorn

from phiserve.api.app import AppState
from phiserve.engine.llm_engine import EngineConfig
from phiserve.host import ServeOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, help="OpenAI-compatible server for Phi-4 and Llama-family models.")


@app.command()
def serve(
    model: str = typer.Option(None, help="GGUF file, Hugging Face folder or Hub id. Default: the embedded SmolLM2-135M-Instruct."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    served_model_name: str = typer.Option(None, help="Name clients pass as `model`. Default: the model's own name."),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16|int8|int4: weight format (see docs/performance.md)."),
    device: str = typer.Option("auto", help="auto|cpu|cuda"),
    threads: int = typer.Option(None, help="Torch CPU threads (default: all cores)."),
    block_size: int = typer.Option(16, help="Tokens per KV cache block."),
    kv_cache_memory: float = typer.Option(None, help="KV cache pool size in GiB. Default: 0.5 on CPU; on CUDA 90% of the memory free after loading."),
    max_num_batched_tokens: int = typer.Option(None, help="Token budget of one engine step. Default: 512 on CPU, 2048 on CUDA."),
    max_num_seqs: int = typer.Option(None, help="Most sequences running at once. Default: 32 on CPU, 64 on CUDA."),
    max_model_len: int = typer.Option(None, help="Context length (default: the model's, capped by the KV pool)."),
    no_prefix_caching: bool = typer.Option(False, "--no-prefix-caching", help="Disable prefix caching."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="On CUDA, run decode steps eagerly instead of replaying CUDA graphs."),
    input_price: float = typer.Option(None, help="USD per million prompt tokens, for usage.estimated_cost."),
    output_price: float = typer.Option(None, help="USD per million completion tokens."),
    api_key: str = typer.Option(None, envvar="PHISERVE_API_KEY", help="Require this bearer token."),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve one model over the OpenAI Chat Completions API."""
    from phiserve.api.app import create_app
    from phiserve.models.loader import ModelNotFoundError, resolve_model

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:  # find (and download, with a progress bar) before listening, so a bad --model is one line
        if model is not None:
            resolved = resolve_model(model)
            model, served_model_name = str(resolved.path), served_model_name or resolved.served_name
    except ModelNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    # left unset (None): the device's defaults (host.py)
    sized = {
        "kv_cache_bytes": None if kv_cache_memory is None else int(kv_cache_memory * 2**30),
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs,
    }
    options = ServeOptions(
        model=model,
        served_model_name=served_model_name,
        dtype=dtype,
        device=device,
        threads=threads,
        engine=EngineConfig(
            block_size=block_size,
            max_model_len=max_model_len,
            enable_prefix_caching=not no_prefix_caching,
            cuda_graphs=not enforce_eager,
            **{name: value for name, value in sized.items() if value is not None},
        ),
        engine_sized_by_device=frozenset(name for name, value in sized.items() if value is None),
        input_price=input_price,
        output_price=output_price,
        api_key=api_key,
        engine_on_caller_thread=True,
    )
    app = create_app(options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    serve_http(server, app.state.phiserve)


def serve_http(server: uvicorn.Server, state: AppState) -> None:
    """HTTP in a background thread (answering 503 while the model loads); the model loads and the
    engine loop runs on this (main) thread. SIGINT/SIGTERM, or the HTTP server ending, stop both."""

    def shutdown(*_: object) -> None:
        server.should_exit = True
        state.stop()

    def run_http() -> None:
        try:
            server.run()
        finally:  # e.g. the port was taken: no engine without a server
            state.stop()

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    http = threading.Thread(target=run_http, name="phiserve-http")
    http.start()
    state.load_and_run()
    server.should_exit = True
    http.join()
    if state.load_error is not None or not server.started:  # the model or the HTTP server failed
        raise typer.Exit(code=1)


@app.callback()
def main() -> None:
    """phiserve: OpenAI-compatible inference for Phi-4 and its family."""
