# The README's two commands: `make demo` (train + evaluate on the embedded sample) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# Caches stay inside the repo: importing diffusers/evaluate writes a torch inductor cache otherwise.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/torchinductor
export HF_HOME := $(CURDIR)/.cache/huggingface
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test quality install

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on this machine's disk; a bare `torch` requirement would pull a CUDA build.
	$(PYTHON) -m pip install --quiet "torch==2.13.0"
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PYTHON) train_hf.py --output_dir outputs/demo

test: install quality
	$(PYTHON) -m pytest -q

quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
