# Everything runs from a local virtual environment, created on first use.
# TORCH_SPEC picks the torch build: users get the plain range; CI pins the CPU wheel.
PYTHON     ?= python3
TORCH_SPEC ?= torch>=2.2
VENV       := .venv
PY         := $(VENV)/bin/python
DATA       ?= ../shared/data/tinyshakespeare/input.txt
# One stamp per set of extras: torch first from TORCH_SPEC, then the extras a target needs.
BASE_STAMP  := $(VENV)/.installed-torch
TRAIN_STAMP := $(VENV)/.installed-train
STAMP       := $(VENV)/.installed-test

.PHONY: setup train train-torch check-data test test-slow parity-report bench figures clean

setup: $(STAMP)

$(BASE_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

$(TRAIN_STAMP): $(BASE_STAMP)
	$(PY) -m pip install --quiet -e ".[torch,train]"
	touch $@

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@ $(TRAIN_STAMP)

# Train the NumPy GPT with the default (nanoGPT CPU) recipe, then print a sample. ARGS="..." adds
# flags (ARGS=--resume continues the run in out/). A fresh run moves an earlier one in out/ aside into
# out/run-<date>-<time>/ (--move_aside) rather than replacing it, so `make train` twice just works.
# DATA=path given here must exist; the default is used only where it exists (else: NPGPT_DATA, the
# cache, or a download).
ARGS ?=
# --move_aside unless ARGS says what to do with the earlier run (the three exclude each other)
MOVE_ASIDE = $(if $(filter --resume --overwrite --move_aside,$(ARGS)),,--move_aside)
DATA_FLAG = $(if $(wildcard $(DATA)),--data $(DATA),$(if $(filter file,$(origin DATA)),,$(error DATA=$(DATA): no such file; pass the path of the training text, e.g. make train DATA=path/to/input.txt)))
train: check-data $(TRAIN_STAMP)
	$(PY) train_np.py $(DATA_FLAG) $(MOVE_ASIDE) $(ARGS)

train-torch: check-data $(TRAIN_STAMP)
	$(PY) train_torch.py $(DATA_FLAG) $(MOVE_ASIDE) $(ARGS)

check-data:  # first, so that a wrong DATA= stops make before any install
	@: $(DATA_FLAG)

# The whole default test suite: unit tests and the NumPy/PyTorch parity suite.
# Two pytest workers, one BLAS/OpenMP thread each: more threads than cores only spin.
TEST_ENV := $(if $(wildcard $(DATA)),NPGPT_DATA=$(abspath $(DATA))) OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 -m slow

# The README's pictures (loss curves, attention maps, parity errors) into docs/figures/.
figures: $(STAMP)
	$(if $(wildcard $(DATA)),NPGPT_DATA=$(abspath $(DATA))) MPLBACKEND=Agg $(PY) docs/figures.py --out docs/figures

parity-report: $(STAMP)
	$(PY) -m parity_tests.report

# CPU benchmarks, npgpt beside torchgpt in one run each (bench/RESULTS.md has the latest figures).
bench: $(STAMP)
	$(PY) bench/step_time.py
	$(PY) bench/step_time.py --mode memory
	$(PY) bench/step_time.py --mode generate

clean:
	rm -rf $(VENV) out* .pytest_cache .hypothesis

# On a CUDA machine, one command: the CUDA parity tests, tiny runs (compile on/off, bf16/float32),
# save and resume on CUDA and on the CPU, torchrun with 2 GPUs, and bench/time_to_loss.py gpu; figures in
# out/gpu-check/. Runs the source tree with $(PYTHON) (PYTHONPATH=.), installing nothing. Without a
# GPU it says so and exits 0 (GPU_CHECK_ARGS=--require-gpu or GPU_CHECK_REQUIRE=1: exit 2);
# GPU_CHECK_ARGS=--dry-run prints the steps. docs/training.md, "First run on a GPU".
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=. $(PYTHON) bench/gpu_check.py --data "$(DATA)" $(GPU_CHECK_ARGS)
