# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= diffusion,dev
PIPELINE ?= all
PY := $(VENV)/bin/python

.PHONY: install serve test test-gpu lint openapi tiny-models

# torch comes from constraints.txt in this same pip command, so pip never reaches for CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-cache-dir -c constraints.txt -e '.[$(EXTRAS)]'
	$(PY) -c "import importlib.util as u, sys; sys.exit('torchvision must not be installed in the CPU env' if u.find_spec('torchvision') else 0)"
	touch $@

install: $(VENV)/.installed

serve: install
	PIPELINE=$(PIPELINE) $(PY) -m runner

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# Exit 5 means pytest collected nothing: no CUDA on this machine, which is not a failure.
test-gpu: install
	$(PY) -m pytest -q -m gpu tests/gpu; rc=$$?; [ $$rc -eq 5 ] && echo "no CUDA: GPU suite skipped" && exit 0; exit $$rc

lint: install
	$(VENV)/bin/ruff check .

openapi: install
	$(PY) scripts/gen_openapi.py

tiny-models: install
	$(PY) scripts/make_tiny_models.py
