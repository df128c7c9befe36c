# `make run` and `make test` work on a fresh clone: the virtual environment is created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision pinned together on every pip call (this pair installs from local disk, CPU OK)
PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: run run-full test venv bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PINS) -e ".[test,diffusers,slurm,k-diffusion]"
	touch $@

venv: $(VENV)/.installed

# The digits Table 2: 11 solvers x NFE 3/5/7/9, 2000 samples per cell (finished cells are skipped on
# a re-run), and the limit cell (the ODE reference, eval.ode_reference: Heun, 40 NFE, scored as a cell from
# its cache, no sampling: conf/solver/ode_reference.yaml), then the table (markdown, LaTeX, CSV, its ratio
# view) and the FID-vs-NFE plot in outputs/table2_digits/.
run: venv
	@start=$$(date +%s); \
	$(PY) -m amedlab -m experiments=table2_digits && \
	$(PY) -m amedlab -m experiments=table2_digits solver=ode_reference nfe=40 && \
	$(PY) -m amedlab stage=table sweep_dir=outputs/table2_digits logger=wandb && \
	echo "make run: $$(( $$(date +%s) - start )) s wall time"

# The same table with every trained row from k = 3 training seeds (docs/evaluation.md, training replicates):
# make run's sweep (seed 0), then the trained solvers again at seed=1,2 into the same sweep folder (cell
# folders nfe=N,seed=R,solver=S: seed is a swept key of the folder names), the limit cell and the table,
# which pools each trained row's replicates (mean, interval over training and evaluation seeds, spread).
# Cost: make run plus twice its 20 trained cells (each replicate distils or trains again, on its own teacher
# trajectories): ~2.8x make run's wall time, estimated from the cells' timing.total_s (docs/evaluation.md).
TRAINED_SOLVERS := amed,amed_plugin,amed_plugin_vs,amed_plugin_vs_grid,learned
TRAIN_SEEDS := 1,2
run-full: venv
	@start=$$(date +%s); \
	$(PY) -m amedlab -m experiments=table2_digits && \
	$(PY) -m amedlab -m experiments=table2_digits solver=$(TRAINED_SOLVERS) seed=$(TRAIN_SEEDS) && \
	$(PY) -m amedlab -m experiments=table2_digits solver=ode_reference nfe=40 && \
	$(PY) -m amedlab stage=table sweep_dir=outputs/table2_digits logger=wandb && \
	echo "make run-full: $$(( $$(date +%s) - start )) s wall time"

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/solver_overhead.py

clean:
	rm -rf outputs multirun
