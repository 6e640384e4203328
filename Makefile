# Set-up and entry points for a fresh Debian machine with Python 3.11.
#   make train   # creates .venv, installs the project (and ffmpeg), trains the demo model
#   make test    # creates .venv, installs the project (and ffmpeg), runs the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=
# Two test processes: most tests compile on one core for most of their time.
PYTEST_WORKERS ?= 2

.PHONY: train test setup ffmpeg

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(MAKE) --no-print-directory ffmpeg
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

# musdb and museval call ffprobe/ffmpeg even for wav files.
ffmpeg:
	@command -v ffprobe >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q ffmpeg; }

train: setup
	$(VENV)/bin/python train.py --config=configs/bsmamba2.py:demo --workdir=$(WORKDIR)

test: setup
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)
