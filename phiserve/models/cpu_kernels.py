"""Our CPU kernels (``csrc/cpu_kernels.cpp``), compiled for this machine at first use.

``available()`` builds them once per source version (cached by torch under ``~/.cache/torch_extensions``,
or ``$TORCH_EXTENSIONS_DIR``) and says whether ``torch.ops.phiserve`` can be used. Without a C++ compiler,
or with ``PHISERVE_CPU_KERNELS=0``, the model falls back to torch's own kernels (slower, same results
up to rounding). ``python -m phiserve.models.cpu_kernels`` builds ahead of time (``make`` does).
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"


@cache
def available() -> bool:
    if os.environ.get("PHISERVE_CPU_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH; the pip package ships one
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

        cpp_extension.load(
            name="phiserve_cpu_kernels",
            sources=[str(SOURCE)],
            # -march=native: built on the machine that runs it (like llama.cpp's GGML_NATIVE).
            # -fopenmp: at::parallel_for runs on torch's OpenMP threads; no -ffast-math (fixed rounding).
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use torch's kernels
        log.warning("CPU kernels unavailable (%s); using torch's kernels", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return False
    return hasattr(torch.ops.phiserve, "int4_linear")


def usable(*tensors: torch.Tensor, kv_cache: torch.Tensor | None = None) -> bool:
    """Whether our kernels take these tensors: all float32 on the CPU (a KV cache float32 or float16),
    and the kernels built."""
    if kv_cache is not None and kv_cache.dtype not in (torch.float32, torch.float16):
        return False
    return all(t.is_cpu and t.dtype == torch.float32 for t in tensors) and available()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print("phiserve CPU kernels:", "built" if available() else "unavailable (torch fallback)")
