# Everything runs from a local virtual environment, created on first use, holding what the target
# needs and no more: `make train` the NumPy side (numpy, scipy, numba, tqdm, matplotlib; no torch),
# `make train-torch` and `make test` torch as well.
# TORCH_SPEC picks the torch build: users get the plain range; CI pins the CPU wheel.
PYTHON     ?= python3
TORCH_SPEC ?= torch>=2.2
VENV       := .venv
PY         := $(VENV)/bin/python
DATA       ?= ../shared/data/tinyshakespeare/input.txt
# --no-compile: Python writes the bytecode of the modules a run imports, not of every installed file
# (about 100 MB less in a .venv that `make train` made).
PIP        := -m pip install --quiet --no-compile
# One stamp per set of extras; each target installs on top of the one before it. torch comes first
# from TORCH_SPEC, so that the torch extra's range finds it installed rather than picking a build.
VENV_STAMP  := $(VENV)/.created
TRAIN_STAMP := $(VENV)/.installed-train
TORCH_STAMP := $(VENV)/.installed-torch
STAMP       := $(VENV)/.installed-test

.PHONY: setup train train-torch check-data test test-slow test-base test-portability parity-report bench figures clean

setup: $(STAMP)

$(VENV_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP) --upgrade pip
	touch $@

$(TRAIN_STAMP): $(VENV_STAMP) pyproject.toml Makefile
	$(PY) $(PIP) -e ".[train]"
	touch $@

$(TORCH_STAMP): $(TRAIN_STAMP)
	$(PY) $(PIP) "$(TORCH_SPEC)"
	$(PY) $(PIP) -e ".[torch,train]"
	touch $@

# The suite starts many interpreters at once (two workers, the scripts, torchrun's ranks): the bytecode of
# every installed module is written here first, on all cores, rather than by each of them as it imports
# (`|| true`: a few test files inside torch are written for a newer Python and never imported here).
$(STAMP): $(TORCH_STAMP)
	$(PY) $(PIP) -e ".[test]"
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true
	touch $@

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

train-torch: check-data $(TORCH_STAMP)
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

# The NumPy side's own tests in .venv-base, which holds the base install (`pip install -e .`: numpy,
# scipy) and the test runner only: no torch, no numba (npgpt.fast runs on NumPy), no tqdm, no matplotlib.
BASE_VENV  := .venv-base
BASE_PY    := $(BASE_VENV)/bin/python
BASE_STAMP := $(BASE_VENV)/.installed-base
BASE_TESTS := tests/test_layers.py tests/test_model.py tests/test_fastpath.py tests/test_optim.py tests/test_data.py \
              tests/test_config.py tests/test_bounds.py tests/test_exercises.py tests/test_exercise_mistakes.py
BASE_ABSENT := torch numba tqdm matplotlib

$(BASE_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(BASE_VENV)
	$(BASE_PY) $(PIP) -e . pytest hypothesis pytest-xdist
	touch $@

test-base: $(BASE_STAMP)
	@$(BASE_PY) -c "import importlib.util as u, sys; extra = [m for m in sys.argv[1:] if u.find_spec(m)]; \
		sys.exit(f'$(BASE_VENV) holds {extra}: not the base install; make clean, then make test-base') if extra else None" $(BASE_ABSENT)
	$(TEST_ENV) $(BASE_PY) -m pytest -q -n 2 $(BASE_TESTS)

# The numerically sensitive tests under each OpenBLAS kernel family this CPU can run, numba compiled
# for this CPU and for a generic x86-64, on 1 and 2 threads (tools/portability.py --list: the matrix).
# VARIANT=nehalem-generic-1 runs one variant (family-numba-threads).
test-portability: $(STAMP)
	$(if $(wildcard $(DATA)),NPGPT_DATA=$(abspath $(DATA))) $(PY) tools/portability.py $(if $(VARIANT),--variant $(VARIANT))

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
	rm -rf $(VENV) $(BASE_VENV) build/portability out* .pytest_cache .hypothesis

# On a CUDA machine, one command: the CUDA parity tests, tiny runs (compile on/off, bf16/float32),
# save and resume on CUDA and on the CPU, torchrun with 2 GPUs, and bench/time_to_loss.py gpu; figures in
# out/gpu-check/. Runs the source tree with $(PYTHON) (PYTHONPATH=.), installing nothing. Without a
# GPU it says so and exits 0 (GPU_CHECK_ARGS=--require-gpu or GPU_CHECK_REQUIRE=1: exit 2);
# GPU_CHECK_ARGS=--dry-run prints the steps. docs/training.md, "First run on a GPU".
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=. $(PYTHON) bench/gpu_check.py --data "$(DATA)" $(GPU_CHECK_ARGS)
