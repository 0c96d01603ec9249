# ihas-lightning: every target that runs code depends on `install`, so each works on a fresh clone.
PY_BOOT ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP   := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-unit test-all bad-inputs bench bench-data bench-train bench-train-load bench-train-alloc bench-fuxictr bench-fuxictr-e2e bench-serve bench-scale bench-gpu acceptance acceptance-real baselines tune lint format clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# the pinned CPU torch first: an unpinned `torch` would pull a multi-GB CUDA build
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -e '.[dev,serve,launch]'
	touch $(STAMP)

install: $(STAMP) ## create .venv with torch==$(TORCH_VERSION) (CPU) and the package in editable mode

demo: install ## run the whole iHAS pipeline on the embedded synthetic dataset
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m ihas_lightning stage=all dataset=synthetic

test: install ## run the default (fast) test suite
	WANDB_MODE=offline $(PY) -m pytest -q

# the unit tier: models, layers, optimizer, schedules, statistics; no stage runs (~30 s on 2 cores)
UNIT_TESTS := tests/test_allocator.py tests/test_backbones.py tests/test_compact.py tests/test_embedding.py \
	tests/test_gate.py tests/test_layers.py tests/test_optim.py tests/test_schedule.py tests/test_selectors.py \
	tests/test_stats.py

test-unit: install ## the unit tier for the edit loop (< 60 s): the tests that run no stage
	WANDB_MODE=offline $(PY) -m pytest -q $(UNIT_TESTS)

test-all: install ## run every test, the slow ones included
	WANDB_MODE=offline $(PY) -m pytest -q -m "slow or not slow"

bad-inputs: install ## 53 bad command lines: exit code and first line of each -> experiments/results/bad_inputs_after.{json,md}
	$(PY) -m experiments.bench.bad_inputs

bench-serve: install ## inference, ~10 min: Base (as trained, folded) vs routed iHAS (exact, fast in one lookup, models only, onnxruntime) at batch 1/256/4096 on synthetic, 2M generated Criteo rows and a 1M-id shape -> experiments/results/bench_serve.{json,md}
	$(PY) -m experiments.bench.bench_serve

bench-scale: install ## the whole pipeline on 5M generated Criteo rows (~8 min), per stage: seconds, rows/s, peak RSS; extrapolated to 45.8M rows -> experiments/results/bench_scale.{json,md}
	$(PY) -m experiments.bench.bench_scale $(BENCH_SCALE_ARGS)

ACCEL ?= gpu
bench-gpu: install ## <= 5 min on one GPU: train samples/s (data on the device, fp32/bf16), routed rows/s, CPU/GPU AUC parity -> experiments/results/bench_gpu.json (ACCEL=cpu: the CPU dry run)
	$(PY) -m experiments.bench.bench_gpu --accelerator $(ACCEL) $(if $(filter cpu,$(ACCEL)),--out experiments/results/bench_gpu_cpu_dryrun.json,)

bench: bench-data bench-train ## run all benchmarks (results in experiments/results/)

bench-data: install ## preprocessing and loader throughput -> experiments/results/bench_data.{json,md}
	$(PY) -m experiments.bench.bench_data

bench-train: install ## training throughput vs a textbook dense-Adam loop, the optimizer's duplicate merge side by side, quiet vs one core busy, malloc tuning on vs off -> experiments/results/bench_{train,optim,train_load,train_alloc}.{json,md}
	$(PY) -m experiments.bench.bench_train
	$(PY) -m experiments.bench.bench_optim
	$(PY) -m experiments.bench.bench_load
	$(PY) -m experiments.bench.bench_alloc

bench-train-alloc: install ## ~12 min: trainer.malloc_tuning on vs off, stage=search on 1M generated Criteo rows, quiet and one core busy -> experiments/results/bench_train_alloc.{json,md}
	$(PY) -m experiments.bench.bench_alloc

bench-fuxictr: install ## ~6 min: Base's training step vs FuxiCTR 2.3.10's (its BaseModel.train_step), quiet and one core busy -> experiments/results/bench_fuxictr.{json,md}
	$(PIP) install -q -e '.[compare]'
	$(PY) -m experiments.bench.bench_fuxictr

bench-fuxictr-e2e: install ## ~10 min: one epoch of Base as each user runs it, our CLI vs FuxiCTR 2.3.10's NpzDataLoader + train_epoch, on 800k generated Criteo rows, quiet and one core busy -> experiments/results/bench_fuxictr_e2e.{json,md}
	$(PIP) install -q -e '.[compare]'
	$(PY) -m experiments.bench.bench_fuxictr_e2e

bench-train-load: install ## ~14 min: Base and search samples/s quiet and with one core busy (thread settings side by side) -> experiments/results/bench_train_load.{json,md}
	$(PY) -m experiments.bench.bench_load

acceptance: install ## stage=all on the synthetic data, seeds 0-2 -> experiments/results/synthetic_acceptance.{json,md}
	$(PY) -m experiments.bench.acceptance $(ACCEPTANCE_ARGS)

acceptance-real: install ## stage=all with the defaults on the real Criteo/Avazu samples and the low-CTR test beds (seeds 0-4) + synthetic seeds 20-29 -> experiments/results/acceptance_real.{json,md}
	$(PY) -m experiments.bench.acceptance_real $(ACCEPTANCE_ARGS)

baselines: install ## every method (base, ihas, adafs_soft/hard, autofield, optfs) via stage=all, seeds 0-2, synthetic + Criteo sample -> experiments/results/baselines.{json,md}
	$(PY) -m experiments.bench.baselines $(BASELINES_ARGS)

tune: install ## the gate sweeps behind the real datasets' defaults (Hydra Optuna sweeper) -> experiments/results/tune_gate_*.{json,md}
	$(PIP) install -q -e '.[dev,tune]'
	OMP_NUM_THREADS=1 $(PY) -m experiments.bench.tune --dataset criteo
	OMP_NUM_THREADS=1 $(PY) -m experiments.bench.tune --dataset avazu

lint: install ## ruff + the layer contract (import-linter: stages never import each other, no import circle) + no function over 80 lines
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_layers.py

format: install
	$(VENV)/bin/ruff check --fix src tests experiments
	$(VENV)/bin/ruff format src tests experiments

clean: ## remove run outputs (keeps .venv)
	rm -rf outputs multirun wandb .pytest_cache
