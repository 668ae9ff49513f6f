# Two commands a user needs: `make demo` and `make test`. Both build the environment first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the CPU build of torch; an unpinned torch would pull a multi-GB CUDA build
TORCH  ?= torch==2.13.0

.PHONY: demo test install dev install-gpu datasets sandbox test-deps test-compat gpu-check clean

# what a job and the service need (the demo installs nothing more). pip decides which torch wheel (it honours the
# machine's pip settings and TORCH's options, where a local CPU wheel or the CPU index may be named) without
# installing it; uv installs that wheel and the ~100 other packages: in 9 s against 29 s when pip unpacked torch's
# 700 MB itself (uv links its cached copy). uv writes no bytecode: modules compile when first imported, and are
# cached then only where PYTHONDONTWRITEBYTECODE is unset. Where it is set (this CI machine) every process
# compiled MLflow, pandas, SQLAlchemy … from source again: a digits job spent 11.2-12.5 s outside training and
# benchmarking, 6.2-6.9 s with the bytecode cached. So the recipes here never see it; compiling all at install
# instead (uv --compile-bytecode) cost make demo ~30 s (275 s against 244), ~15,000 files being plotly that no
# job imports.
unexport PYTHONDONTWRITEBYTECODE
UV     ?= uv>=0.5
$(BIN)/mlgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet '$(UV)'
	$(BIN)/pip install --quiet --dry-run --no-deps --ignore-installed --report $(VENV)/torch-wheel.json $(TORCH)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[examples]' "torch @ $$($(BIN)/python -c \
	  'import json; print(json.load(open("$(VENV)/torch-wheel.json"))["install"][0]["download_info"]["url"])')"
	touch $@

install: $(BIN)/mlgate

# what the tests add: pytest, the Kubernetes and Ray clients and their test servers, act, the GitHub contract.
# uv: 4 s, where pip took 27 s for the same set
$(VENV)/.dev-installed: $(BIN)/mlgate pyproject.toml
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev,examples]'
	touch $@

dev: $(VENV)/.dev-installed

# the example models' data that no PyPI wheel carries: Fashion-MNIST's IDX files, from Debian's package
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
datasets:
	@test -f $(FASHION_MNIST) || { echo "installing Debian's dataset-fashion-mnist (31 MB) for models/fashion_resnet.py"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; }

demo: install datasets
	$(BIN)/mlgate run

# what the tests need beyond Python: real GitHub payloads (npm) and a browser for the dashboard test
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# bubblewrap sandboxes pull-request jobs (triggers/jobs/sandbox.py): `mlgate serve` needs it for PR jobs too
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { echo "installing Debian's bubblewrap, the sandbox for pull-request jobs"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq bubblewrap >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq bubblewrap >/dev/null; }; }

test-deps: node_modules/.installed sandbox
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	command -v google-chrome >/dev/null 2>&1 || { echo "installing Debian's chromium for the dashboard test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }; }

# one worker per core, each module on one worker (its module-scoped training is done once): about half the
# suite waits on subprocesses, services and leases, so two cores run it in two thirds of the time
test: dev test-deps datasets
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# a GPU runner: PyPI's default torch for Linux is the CUDA build; then ONNX Runtime's CUDA/TensorRT providers
install-gpu:
	$(MAKE) install TORCH='torch>=2.11'
	$(BIN)/pip install --quiet -e '.[gpu]'

# on a CUDA machine: the example jobs (digits, Fashion-MNIST ResNet, BBC News Transformer) twice, the variant table, and `pytest -m gpu`
gpu-check: dev
	$(BIN)/python benchmarks/gpu_check.py

# the declared onnxruntime range, oldest and newest, each over the project's environment; the newest is
# what `make install` resolved. CI's compat job also runs the oldest declared torch.
ORT_VERSIONS ?= 1.20.1 1.30.0
test-compat: dev
	$(BIN)/python -m pytest -q -m compat
	@for v in $(ORT_VERSIONS); do \
	  $(BIN)/pip install --quiet --no-deps --target .compat/onnxruntime-$$v onnxruntime==$$v && \
	  echo "onnxruntime $$v:" && PYTHONPATH=.compat/onnxruntime-$$v $(BIN)/python -m pytest -q -m compat || exit 1; \
	done

clean:
	rm -rf $(VENV) .mlgate node_modules .compat
