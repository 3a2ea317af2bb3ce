# Two commands do all set-up: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv results bench clean mosquitto

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is a CPU build found offline; an unpinned torch pulls CUDA.
	$(BIN)/pip install torch==2.13.0

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The MQTT uplink tests run a real broker: mosquitto from the OS packages, installed when missing (CI runs as root
# on a fresh machine); without root and without mosquitto those tests skip, saying why.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y mosquitto; \
	else echo "mosquitto is not installed and this is not root: the MQTT tests will skip"; fi

test: $(STAMP) mosquitto
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/python -m moevit.coordinator.demo

# The paper's Table 1/2 protocol on the bundled digits (about 10 min on 2 cores; add GRID=1 for the E x K grid)
results: $(STAMP)
	$(BIN)/python bench/table1.py $(if $(GRID),--grid,)

clean:
	rm -rf $(VENV) runs build *.egg-info
