"""The command line: a model that cannot be found is one clear line and a non-zero exit, no traceback;
a port that is taken ends the process with a failure status."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("spec", ["someone/not-a-real-model", "/nonexistent/model.gguf"])
def test_unloadable_model_is_one_line(spec):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "phiserve", "serve", "--model", spec], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_help_lists_options():
    r = subprocess.run([sys.executable, "-m", "phiserve", "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for option in ("--model", "--host", "--port", "--served-model-name", "--dtype", "--threads"):
        assert option in r.stdout


def test_port_in_use_exits_non_zero():
    """The HTTP server cannot bind: the process must end (engine included) with a failure status."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "phiserve", "serve", "--port", str(port)], capture_output=True, text=True, timeout=180
        )
    assert r.returncode == 1
    assert "address already in use" in r.stderr
