# Two commands do all set-up: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-split test test-quick lint venv results results-digits pretrain bench clean mosquitto

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

# The fast tier: every test not marked slow or e2e (real process deployments, training runs, long soaks); under
# 2 minutes on 2 cores. `make test` (and CI) still run everything.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/python -m moevit.coordinator.demo

# Where the split pays off: examples/sites-split.yaml (a camera and a relay that cannot hold the model alone),
# placed, simulated beside local and offload-image, and run (README, "When the split pays off"; builds the model once)
demo-split: $(STAMP)
	$(BIN)/python -m moevit.coordinator.demo --split

# Dense vs MoE on scenes under the fair protocol (val selects, eval reports, 3 seeds, equal budgets, MoE within the
# dense parameter count), the gate, bench/results/scenes.{md,json}, class x expert heatmaps in
# bench/results/analysis_scenes/ (about 35 min on 2 cores). FULL=1 adds Table 1, MoE-16 at [2] and Table 2's rows,
# then the 65-way benchmark where layer 8 passes the gate (its headline row, gate and heatmaps only:
# bench/results/scenes65.{md,json}, analysis_scenes65/; about 2 h), then the initialisation ablation with every
# combination fine-tuned (bench/results/init_ablation.{md,json}; hours).
# Resumable: a rerun skips finished steps. Starts from the pretrained trunk (make pretrain).
SCENES65 := scenes:classes=64,per_class=300,size=128,zoo=1,seed=7,split_seed=0,workers=2
results: $(STAMP)
	nice -n 5 $(BIN)/python bench/scenes_results.py --threads 2 $(if $(FULL),--full,)
	$(if $(FULL),nice -n 5 $(BIN)/python bench/scenes_results.py --threads 2 --data $(SCENES65) --dense-epochs 8 \
		--latency-reps 0 --out runs/scenes65 --results bench/results/scenes65 \
		--figures bench/results/analysis_scenes65,@true)
	$(if $(FULL),nice -n 5 $(BIN)/python bench/init_ablation.py --threads 2 --finetune all,@true)

# The earlier small-scale Table 1/2 on the bundled digits (add GRID=1 for the E x K grid)
results-digits: $(STAMP)
	$(BIN)/python bench/table1.py $(if $(GRID),--grid,)

# Pretrain the trunk once on the procedurally generated corpus (moevit/pretrain.py): writes the weights kept in
# weights/ and the recipe JSON beside them (about 55 min on 2 cores). PRETRAIN_ARGS overrides, e.g. a smaller run:
# PRETRAIN_ARGS="--image-size 64 --per-class 185 --epochs 1"
PRETRAIN_ARGS ?= --image-size 96 --classes 64 --per-class 600 --epochs 3 --threads 2 --render-workers 2
pretrain: $(STAMP)
	nice -n 5 $(BIN)/python -m moevit.pretrain --out runs/pretrain96 \
		--weights weights/pretrain-mobilevitv2_050-96.safetensors $(PRETRAIN_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
