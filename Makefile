# Two entry points on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-ar test lint corpus clean-cache browser

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is the CPU wheel on local disk; any other version pulls gigabytes of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,htp,dev]'
	# aimet-onnx makes real encodings in the tests; its pins would replace torch, so it comes
	# last, without deps, after the few it imports (so pip reports no unmet requirement).
	$(BIN)/pip install -q tqdm bokeh jsonschema psutil scipy scikit-learn
	$(BIN)/pip install -q --no-deps aimet-onnx==2.42.0
	touch $@

demo: $(STAMP)
	$(BIN)/python -m mha2sha.demo

demo-ar: $(STAMP)
	$(BIN)/python -m mha2sha.demo build-ar

# The suite includes tests/thirdparty: it builds the third-party tools' own venvs and exports on
# demand (cached under $MHA2SHA_CACHE, default ~/.cache/mha2sha; ~5 min cold, ~20 s warm).
test: $(STAMP) browser
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Build (or reuse) the whole third-party graph corpus and print its catalogue.
corpus: $(STAMP)
	$(BIN)/python -m mha2sha.zoo.thirdparty --build

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

clean-cache:
	rm -rf $${MHA2SHA_CACHE:-$$HOME/.cache/mha2sha}

# Headless Chromium renders the HTML reports in tests/analyze/test_html_browser.py. Installed with
# apt-get where that works (root on Debian/Ubuntu, e.g. a fresh CI machine); anywhere else the
# browser test is skipped with a message saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium) \
	      || echo "chromium could not be installed: the browser test of the HTML report will be skipped"; \
	  else \
	    echo "chromium not installed (needs root and apt-get): the browser test of the HTML report will be skipped"; \
	  fi; }
