# The README's two commands: `make demo` (train + evaluate on the embedded sample) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# Caches stay inside the repo: importing diffusers/evaluate writes a torch inductor cache otherwise.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/torchinductor
export HF_HOME := $(CURDIR)/.cache/huggingface
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# torch first, pinned: these machines hold its CPU wheel, which pip takes; a bare `torch` would pull a CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test unit-test quality install lock

# Exactly the versions the tests passed with (constraints.txt), build dependencies included. --no-compile: Python
# compiles the modules a run imports on first import, not all of every package at install (a minute saved).
PIP_INSTALL := $(PYTHON) -m pip install --quiet --no-compile
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP_INSTALL) "$$(grep '^pip==' constraints.txt)"
	$(PIP_INSTALL) -c constraints.txt "$(TORCH)"
	$(PIP_INSTALL) -c constraints.txt --build-constraint constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PYTHON) train_hf.py --output_dir outputs/demo --overwrite_output_dir

test: install quality
	$(PYTHON) -m pytest -q

# The unit tests alone (seconds): everything not marked slow.
unit-test: install
	$(PYTHON) -m pytest -q -m "not slow"

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Newer releases within pyproject.toml's ranges, in a fresh environment; then `make test` and commit the new pins.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip "setuptools>=68,<85" "$(TORCH)"
	.venv-lock/bin/python -m pip install --quiet -e ".[dev]"
	{ echo "# The exact versions 'make test' passed with (locked $$(date +%F)). 'make install' installs them;"; \
	  echo "# pyproject.toml's ranges are bounded to them. To move to newer releases: 'make lock' (README, Upgrading)."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v '^wheel==' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .venv-lock $(VENV)
	@echo "constraints.txt updated: run 'make test', then commit it"
