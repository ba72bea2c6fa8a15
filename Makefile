# Every target first brings .venv/ to exactly the environment in uv.lock (what the tests last passed on), then runs.
# uv hard-links from its cache, so a fresh environment costs seconds once the cache is warm.
#   make venv | test | demo | bench      the locked environment, then the command
#   make upgrade                         re-resolve uv.lock to the newest allowed versions, then run the tests
#   make lowest                          the tests on the lowest versions pyproject.toml allows (.venv-lowest/)
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.uv/bin/uv)
PYTEST_ARGS ?=
# uv sync installs into this folder (default .venv) with the interpreter .python-version names.
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))

.PHONY: venv test demo ablate bench upgrade lowest clean gpu-check

$(CURDIR)/.uv/bin/uv:
	python3 -m venv $(CURDIR)/.uv && $(CURDIR)/.uv/bin/pip install -q uv==$(UV_VERSION)

# Two steps: the locked dependencies (torch and the build tools among them), then ville itself, built without
# isolation against that torch (its native CPU kernels must match the torch they load into).
$(VENV)/.installed: uv.lock pyproject.toml setup.py $(wildcard csrc/*) | $(UV)
	$(UV) sync -q --locked --extra dev --no-install-project
	$(UV) sync -q --locked --extra dev
	@touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

demo: venv
	$(PY) -m ville.demo

ablate: venv
	$(PY) -m ville.ablate

bench: venv
	$(PY) bench/bench_infonce.py
	$(PY) bench/bench_decode_attention.py
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_data.py
	$(PY) bench/bench_moment_adapter.py

# A GPU machine's fixed image: plain python3, nothing installed or built (bench/gpu_check.py; < 8 min on an H100).
gpu-check:
	python3 bench/gpu_check.py

upgrade: | $(UV)
	$(UV) lock --upgrade
	$(MAKE) test

LOWEST ?= .venv-lowest
lowest: | $(UV)
	$(UV) venv -q --allow-existing $(LOWEST)
	$(UV) pip compile -q pyproject.toml --extra dev --resolution lowest-direct --python $(LOWEST)/bin/python \
		-o $(LOWEST)/requirements.txt
	$(UV) pip sync -q --python $(LOWEST)/bin/python $(LOWEST)/requirements.txt
	$(UV) pip install -q --python $(LOWEST)/bin/python setuptools wheel ninja
	$(UV) pip install -q --python $(LOWEST)/bin/python --no-deps --no-build-isolation --reinstall-package ville .
	$(LOWEST)/bin/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST) .uv build *.egg-info
