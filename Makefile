# The two commands README.md opens with: `make run` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
CORES  ?= all

.PHONY: install run test bench lint clean-work

install: $(VENV)/.installed

# torch is installed first and pinned exactly, so pip takes the CPU wheel on disk
# instead of resolving a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test,slurm]'
	@# Byte-compile once: per-subject jobs start a fresh Python each, and with
	@# PYTHONDONTWRITEBYTECODE set they would otherwise recompile torch/monai/... every time.
	-$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1
	touch $@

# Rules call the `copdssl` CLI, so the environment's bin/ goes first on PATH.
run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES)

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks

lint: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --lint

clean-work:
	rm -rf work results data/synthetic .snakemake
