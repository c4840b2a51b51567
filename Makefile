# make run   : set up (first time) and run the default experiment on the embedded digits data
# make test  : set up (first time) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test lint clean
setup: $(STAMP)

# constraints.txt pins torch 2.14.1 + torchvision 0.29.1 (local files) and everything else,
# so that the set-up never pulls a newer CUDA stack; pyproject.toml keeps loose ranges for users.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: setup
	$(PY) -m mu_runner $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check mu_runner tests

clean:
	rm -rf outputs/runs outputs/multiruns
