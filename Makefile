# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
export UV_CACHE_DIR ?= $(HOME)/.cache/uv
export HIGGS_PIPELINE_CACHE ?= $(HOME)/.cache/higgs_pipeline
# The instance is this folder's dagster.yaml; it keeps everything in .dagster_home/ (higgs_pipeline/instance.py
# holds the defaults, the same ones a plain `dg dev` or `dagster dev` here uses). A DAGSTER_HOME of your own wins.
export DAGSTER_HOME ?= $(CURDIR)
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PY := .venv/bin/python
# dg runs from the project's venv (as if activated), so it does not warn that another environment is active.
export VIRTUAL_ENV := $(CURDIR)/.venv
# Python's bytecode cache on (in __pycache__ folders, git-ignored, as Python does by default): the demo and the tests
# start dozens of Python processes (dg, Dagster's code servers and run workers, torchrun ranks, pytest workers) that
# each import torch, transformers and Dagster. Where the environment turns the cache off (PYTHONDONTWRITEBYTECODE=1,
# as some CI images do), every one of them compiled those from source again: a process loading the code location
# took 16 s of CPU instead of 6.4 s (benchmarks/bench_bytecode_cache.py, docs/benchmarks.md).
export PYTHONDONTWRITEBYTECODE :=

.PHONY: demo test test-fast ui lint validate test-deps

$(UV):
	python3 -m pip install --user --quiet uv==0.13.9

# The venv is (re)synced from the committed lock whenever the lock is newer than it.
.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen
	touch $@

# retrain_job is the whole chain with its checks, in one process (on-demand assets such as merged_model are not in it).
demo: .venv/.synced
	.venv/bin/dg launch --job retrain_job

ui: .venv/.synced
	.venv/bin/dg dev -h 127.0.0.1 -p 3000

# Debian packages the tests use: chromium for the real-browser UI test (never a downloaded browser), espeak-ng and
# sox (with its mp3 format) to generate the speech corpora of the data tests. Installed once where apt is
# available. A failed install fails here, naming what is missing: the tests need every one of them (under CI a
# test that misses one fails; elsewhere it skips, saying why).
TEST_PACKAGES := chromium espeak-ng sox libsox-fmt-mp3
# A real two-speaker phone call with its reference words and turns (tests/test_real_call.py): the 30 s sample that
# pyannote.audio ships in its wheel, read from the wheel (never installed), fetched once from PyPI into the cache.
REAL_CALL_WHEEL := pyannote.audio==4.0.7
test-deps:
	@command -v chromium >/dev/null 2>&1 && command -v espeak-ng >/dev/null 2>&1 && command -v sox >/dev/null 2>&1 \
		&& sox -h 2>/dev/null | grep -q 'mp3' || { command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_PACKAGES) >/dev/null; } || \
		{ echo "make test-deps: could not install $(TEST_PACKAGES) (apt-get missing or failed): install them" >&2; exit 1; }
	@ls $(HIGGS_PIPELINE_CACHE)/real_call/pyannote_audio-*.whl >/dev/null 2>&1 || $(UV) tool run pip download -q --no-deps \
		--only-binary=:all: $(REAL_CALL_WHEEL) -d $(HIGGS_PIPELINE_CACHE)/real_call || \
		{ echo "make test-deps: could not fetch $(REAL_CALL_WHEEL) from PyPI into $(HIGGS_PIPELINE_CACHE)/real_call" >&2; exit 1; }

# The whole suite (what CI runs); the 25 slowest tests are listed at the end, so a slow newcomer shows.
# Two pytest workers (pytest-xdist): most tests keep one core busy, so two share 2 cores well; the tests of the
# shared dev server stay together on one worker (tests/xdist_groups.py). TEST_WORKERS=0 runs in one process.
# One math thread per process (torch, CTranslate2's Whisper): two workers already fill two cores, and tiny models
# gain nothing from threads that only contend (torchrun sets the same for its workers).
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
test test-fast: export OMP_NUM_THREADS ?= $(TEST_THREADS)
test: .venv/.synced test-deps
	$(PY) -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadgroup

# The inner loop: unit and integration tests that start no other process (no torchrun, dg dev, browser, chain).
test-fast: .venv/.synced test-deps
	$(PY) -m pytest -q -ra -m "not slow" -n $(TEST_WORKERS) --dist loadgroup

lint: .venv/.synced
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

validate: .venv/.synced
	.venv/bin/dg check defs
