# Set-up and entry points for a fresh Debian machine with Python 3.11.
#   make train   # creates .venv, installs the project (and ffmpeg), trains the demo model
#   make test    # creates .venv, installs the project (ffmpeg, chromium), runs the test suite,
#                # then the kernel tests under JAX 0.11 in .venv312 (where a Python 3.12 exists)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=
# Two test processes: most tests compile on one core for most of their time. Tests marked
# xdist_group (those sharing one server) run in one process; the rest go wherever is free.
PYTEST_WORKERS ?= 2
# A second venv with Python 3.12 and JAX 0.11 (it needs >= 3.12) for the Pallas kernel tests
# under both JAX versions; `make test312` skips with a message where no Python 3.12 exists.
# The first candidate that runs as Python 3.12 (a pyenv shim may exist without the version).
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python; do \
  $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && \
  { command -v $$p; break; }; done)
VENV312 ?= .venv312
JAX312 ?= jax==0.11.2
KERNEL_TESTS ?= tests/kernels

.PHONY: train test test312 setup setup312 ffmpeg browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory ffmpeg
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test,serve]'
	touch $@

# musdb and museval call ffprobe/ffmpeg even for wav files.
ffmpeg:
	@command -v ffprobe >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q ffmpeg; }

train: setup
	$(VENV)/bin/python train.py --config=configs/bsmamba2.py:demo --workdir=$(WORKDIR)

# The page tests drive Debian's chromium through its chromedriver; they are skipped, saying
# why, where these cannot be installed.
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; } || \
	  echo "warning: could not install chromium and chromium-driver: the page tests will be skipped"

# The whole suite under the main venv's JAX, then the kernel tests again under JAX 0.11.
test: setup browser
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test312

setup312: $(VENV312)/.installed

$(VENV312)/.installed: pyproject.toml
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip
	$(VENV312)/bin/python -m pip install -q -e '.[test]' '$(JAX312)'
	touch $@

# The kernel tests only: the rest of the suite runs under the main venv's JAX.
test312:
	@if [ -z "$(PYTHON312)" ]; then \
	  echo "test312: skipped: no Python 3.12 on this machine (JAX 0.11 needs it); set PYTHON312"; \
	else \
	  $(MAKE) --no-print-directory setup312 && \
	  $(VENV312)/bin/python -m pytest -q -n $(PYTEST_WORKERS) $(KERNEL_TESTS) $(PYTEST_ARGS); \
	fi
