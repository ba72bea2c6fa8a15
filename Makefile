# Every target builds (or refreshes) the virtual environment from setup.py's declared dependencies first.
# uv hard-links from its cache, so a fresh environment costs seconds once the cache is warm.
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(shell command -v uv 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: venv test demo bench clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*)
	@if [ -z "$(UV)" ]; then python3 -m pip install -q uv; fi
	@if [ ! -x "$(PY)" ]; then uv venv -q --python 3.11 $(VENV) || uv venv -q $(VENV); fi
	uv pip install -q --python $(PY) -e ".[dev]"
	@touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: venv
	$(PY) -m ville.demo

bench: venv
	$(PY) bench/bench_infonce.py
	$(PY) bench/bench_decode_attention.py
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_data.py

clean:
	rm -rf $(VENV) build *.egg-info
