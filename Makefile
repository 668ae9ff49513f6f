# Two commands a user needs: `make demo` and `make test`. Both build the environment first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the CPU build of torch; an unpinned torch would pull a multi-GB CUDA build
TORCH  ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/mlgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/mlgate

demo: install
	$(BIN)/mlgate run

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .mlgate
