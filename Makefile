# Two commands do everything on a fresh machine:
#   make demo   # virtual environment + pinned requirements, then the end-to-end demo on synthetic data
#   make test   # virtual environment + pinned requirements (with test tooling), then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: demo demo-cv test test-slow lint kernel lab clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.minimal-installed: requirements_minimal.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements_minimal.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.full-installed: requirements_full.txt $(VENV)/.minimal-installed
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements_full.txt
	touch $@

demo: $(VENV)/.minimal-installed
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) scripts/demo.py --config configs/demo.yaml

# The same pipeline with 3-fold cross-validation of both models, compared on every case out of fold
# (13-20 minutes on two cores; results in reports/demo_cv/results.md).
demo-cv: $(VENV)/.minimal-installed
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) scripts/demo.py --config configs/demo_cv.yaml

# One compute thread per test process: two pytest workers on two cores, no oversubscription
# (idle OpenMP threads spinning against each other slow small models down many times over).
test: lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} WANDB_MODE=disabled $(PY) -m pytest $(PYTEST_ARGS)

# The slow checks (marked slow): each quick model must fit one case (tests/test_overfit.py).
test-slow: $(VENV)/.full-installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} WANDB_MODE=disabled $(PY) -m pytest -m slow -v

# pyflakes, import order, pycodestyle and bugbear over the whole tree, notebooks included (pyproject.toml).
lint: $(VENV)/.full-installed
	$(VENV)/bin/ruff check .

# The project's Jupyter kernel, registered inside the virtual environment (no files in ~/.local).
kernel: $(VENV)/.full-installed
	$(PY) -m ipykernel install --sys-prefix --name kits19-segmentation --display-name "Python (kits19-segmentation)"

lab: kernel
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

clean-venv:
	rm -rf $(VENV)
