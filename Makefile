# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= diffusion,speech-vision,llm,dev
TTS_VENV ?= .venv-tts
PIPELINE ?= all
PY := $(VENV)/bin/python
TTS_PY := $(TTS_VENV)/bin/python

.PHONY: install install-tts serve serve-tts test test-gpu lint image-check openapi tiny-models

# torch comes from constraints.txt in this same pip command, so pip never reaches for CUDA wheels.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --no-cache-dir -c constraints.txt -e '.[$(EXTRAS)]'
	# The sam2 package (SAM2's official .pt loader, tested here too) without the torchvision it
	# declares: the reachable torchvision wheel is a CUDA build that breaks diffusers on this
	# torch. sam2 is an sdist whose build imports torch: no build isolation, so it builds with
	# the torch installed above instead of fetching another.
	SAM2_BUILD_CUDA=0 $(VENV)/bin/pip install -q --no-cache-dir --no-build-isolation --no-deps \
		-c constraints.txt sam2
	$(PY) -c "import importlib.util as u, sys; sys.exit('torchvision must not be installed in the CPU env' if u.find_spec('torchvision') else 0)"
	touch $@

install: $(VENV)/.installed

# text-to-speech's own environment (parler-tts needs transformers <= 4.51). torchaudio's PyPI
# wheel links CUDA torch; its compiled ops are unused (audio is resampled in-app), so they go.
$(TTS_VENV)/.installed: pyproject.toml constraints-tts.txt
	$(PYTHON) -m venv $(TTS_VENV)
	$(TTS_VENV)/bin/pip install -q --no-cache-dir -c constraints-tts.txt -e '.[tts,dev]'
	rm -f $(TTS_VENV)/lib/python*/site-packages/torchaudio/lib/*.so
	$(TTS_PY) -c "import parler_tts"
	touch $@

install-tts: $(TTS_VENV)/.installed

serve: install
	PIPELINE=$(PIPELINE) $(PY) -m runner

serve-tts: install-tts
	PIPELINE=text-to-speech $(TTS_PY) -m runner

test: install install-tts
	OMP_NUM_THREADS=1 $(PY) -m pytest -q
	OMP_NUM_THREADS=1 $(TTS_PY) -m pytest -q tests/tts tests/api/test_cuda_branches_on_cpu.py
	OMP_NUM_THREADS=1 $(TTS_PY) -m pytest -q tests/hardening/test_fuzz_openapi.py -k speech

# Exit 5 means pytest collected nothing: no CUDA on this machine, which is not a failure.
test-gpu: install
	$(PY) -m pytest -q -m gpu tests/gpu; rc=$$?; [ $$rc -eq 5 ] && echo "no CUDA: GPU suite skipped" && exit 0; exit $$rc

# ruff, then mypy on runner/ and pipelines/ ([tool.mypy] in pyproject.toml); CI runs it first.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Every image of docker/Dockerfile built with podman (no Docker daemon; installed from Debian's
# packages when missing) and run as go-livepeer runs it, in CPU tiny mode (docs/deploy.md).
image-check: install
	VENV=$(VENV) scripts/image_check.sh $(IMAGE_CHECK_ARGS)

openapi: install
	$(PY) scripts/gen_openapi.py

tiny-models: install
	$(PY) scripts/make_tiny_models.py
