# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install biopsyquant, score every sample image -> demo_output/
#   make test   - create .venv, install biopsyquant + test tools, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,napari,parquet]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/biopsyquant demo --out demo_output

test: $(STAMP)
	@if command -v xvfb-run >/dev/null 2>&1; then \
		xvfb-run -a -s "-screen 0 1400x1000x24" $(BIN)/python -m pytest -q -p no:cacheprovider; \
	else \
		echo "xvfb-run not found: GUI tests need a display"; \
		$(BIN)/python -m pytest -q -p no:cacheprovider; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check biopsyquant plugins tests benchmarks

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) demo_output
