# make run   : set up (first time) and run the default experiment on the embedded digits data
# make test  : set up (first time) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test lint clean results report study privacy tune bench
setup: $(STAMP)

# constraints.txt pins torch 2.14.1 + torchvision 0.29.1 (local files) and everything else,
# so that the set-up never pulls a newer CUDA stack; pyproject.toml keeps loose ranges for users.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: setup
	$(PY) -m mu_runner $(ARGS)

# one pytest-xdist worker per core, each test module on one worker (its fixtures built once);
# make test PYTEST_ARGS="tests/test_run.py -k cache" runs a subset in one process
PYTEST_ARGS ?= -n auto --dist loadscope
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Every method on digits: class k=1 and random 10 %, held-out seeds 3-5 -> docs/results_digits.md
RESULTS_DIR ?= outputs/multiruns/method_table
# (mnemonic and weight_filter refuse forget=random: the sweep ends with their summary and exit code 1,
# so make goes on to the report, which lists them). BASELINE=<another sweep dir> adds a table against it,
# headed "Against $(BASELINE_NAME)".
BASELINE_NAME ?= baseline
results: setup
	-$(PY) -m mu_runner -m experiment=method_table hydra.sweep.dir=$(RESULTS_DIR)
	$(PY) -m mu_runner.report $(RESULTS_DIR) --md docs/results_digits.md \
		--title "Methods on digits (ResNet-18, make results)" \
		$(if $(BASELINE),--baseline $(BASELINE) --baseline-name "$(BASELINE_NAME)")

# The removed-classes study at equal forgetting (random_label, weight_reset, salun; k = 1..5; 3 seeds) -> docs/study_digits.md
STUDY_DIR ?= outputs/multiruns/forget_scaling
study: setup
	$(PY) -m mu_runner experiment=forget_scaling hydra.sweep.dir=$(STUDY_DIR) $(ARGS)
	$(PY) -m mu_runner.report $(STUDY_DIR) --md docs/study_digits.md \
		--title "The removed-classes study on digits (ResNet-18 at half width, 16 px, equal forgetting, make study)"

# Tune every method's knobs against the retrained model (seeds 0-2, validation views; resumable:
# each study lives in outputs/tuning/<method>.db) -> outputs/tuning/<method>/<forget>/optimization_results.yaml
TUNE_METHODS ?= ssd weight_filter mnemonic finetune grad_ascent neggrad_plus random_label salun \
	l1_sparse bad_teacher scrub boundary_shrink dlfd snu weight_reset
tune: setup
	for m in $(TUNE_METHODS); do $(PY) -m mu_runner experiment=tune method=$$m $(ARGS) || exit 1; done

# Per-example privacy on digits (train=memorize, eval.umia=lira, every method, seed 0) -> docs/privacy_digits.md
# (as in results: the class-only methods' refusals of forget=random do not stop the report)
PRIVACY_DIR ?= outputs/multiruns/privacy
privacy: setup
	-$(PY) -m mu_runner -m experiment=privacy hydra.sweep.dir=$(PRIVACY_DIR) $(ARGS)
	$(PY) -m mu_runner.report $(PRIVACY_DIR) --md docs/privacy_digits.md \
		--title "Per-example privacy on digits (test ResNet, train=memorize, make privacy)"

# Throughput vs a plain PyTorch loop (digits, CIFAR-shaped), the evaluation's share of a run, the trainings
# of a sweep; a few minutes on 2 cores; not part of make test -> outputs/bench/bench.json (docs/benchmarks.md)
bench: setup
	$(PY) -m bench.cpu $(ARGS)

# A table and plots from any sweep directory: make report DIR=outputs/multiruns/<time>
report: setup
	$(PY) -m mu_runner.report $(DIR)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf outputs/runs outputs/multiruns
