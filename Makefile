# Set-up and entry points for a fresh Debian machine with Python 3.11.
#   make train   # creates .venv, installs the project (and ffmpeg), trains the demo model
#   make test    # creates .venv, installs the project (ffmpeg, chromium), runs the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=
# Two test processes: most tests compile on one core for most of their time. Tests marked
# xdist_group (those sharing one server) run in one process; the rest go wherever is free.
PYTEST_WORKERS ?= 2

.PHONY: train test setup ffmpeg browser

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

test: setup browser
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)
