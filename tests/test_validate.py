"""Bad input is refused before any work: one line per problem, every problem at once, exit code 2.

Each BAD row is a row of docs/reliability.md ("Bad input refused before any work"): the overrides a
user types and the exact line they get (`*` stands for a long list of allowed keys).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import main_in_process
from conftest import TINY, compose_config

import mu_runner.run as R
from mu_runner.errors import ConfigError
from mu_runner.validate import problems, validate

LIFT = "an integer >= 1 (the original and the reference are trained; an untrained original is refused)"
SEED = "an integer in 0..4294967295"
LR = "a finite learning rate > 0"
VAL = "a fraction in [0, 1) of the training images held out for validation"

BAD = [  # (id, overrides, the one line)
    # unknown keys: nothing reads them
    ("forget-kk", ["+forget.kk=3"], "forget.kk: unknown key (allowed: *); did you mean k?"),
    ("train-epoch", ["+train.epoch=5"],
     "train.epoch: unknown key (allowed: batch_size, epochs, optimizer, scheduler); did you mean epochs?"),
    ("top-seed2", ["+seed2=1"], "seed2: unknown key (allowed: *); did you mean seed?"),
    ("trainer-typo", ["+trainer.max_stepz=3"], "trainer.max_stepz: unknown key (allowed: *); did you mean max_steps?"),
    ("method-key", ["+method.lr=0.1"], "method.lr: unknown key (allowed: batch_size, epochs, net, optimizer, "
                                      "scheduler, search, seed)"),
    ("optimizer-key", ["+method.optimizer.momentumm=0.9"],
     "method.optimizer.momentumm: unknown key (allowed: *); did you mean momentum?"),
    ("augment-key", ["+data.augment.rotate=10"], "data.augment.rotate: unknown key (allowed: flip, pad)"),
    ("lira-key", ["+eval.lira.shadow=4"], "eval.lira.shadow: unknown key (allowed: seed, shadows); did you mean shadows?"),
    ("eval-key", ["+eval.mia_draw=3"], "eval.mia_draw: unknown key (allowed: *); did you mean mia_draws?"),
    ("backbone-key", ["+backbone.small_stems=true"],
     "backbone.small_stems: unknown key (allowed: *); did you mean small_stem?"),
    ("source-key", ["data=synthetic", "+data.source.n_trian=5"],
     "data.source.n_trian: unknown key (allowed: *); did you mean n_train?"),
    ("paths-key", ["+paths.out_dir=x"], "paths.out_dir: unknown key (allowed: cache_dir, data_dir, output_dir, root_dir); did you mean output_dir?"),
    ("callbacks-key", ["+callbacks.eval_every=2"],
     "callbacks.eval_every: unknown key (allowed: *); did you mean eval_every_n_epochs?"),
    # types and ranges
    ("epochs-abc", ["train.epochs=abc"], f"train.epochs='abc': allowed {LIFT}"),
    ("epochs-0", ["train.epochs=0"], f"train.epochs=0: allowed {LIFT}"),
    ("seed-float", ["seed=1.5"], f"seed=1.5: allowed {SEED}"),
    ("seed-negative", ["seed=-1"], f"seed=-1: allowed {SEED}"),
    ("forget-seed-abc", ["forget.seed=abc"], f"forget.seed='abc': allowed {SEED}"),
    ("val-1.5", ["data.val_fraction=1.5"], f"data.val_fraction=1.5: allowed {VAL}"),
    ("val-negative", ["data.val_fraction=-0.1"], f"data.val_fraction=-0.1: allowed {VAL}"),
    ("train-lr-negative", ["train.optimizer.lr=-1"], f"train.optimizer.lr=-1: allowed {LR}"),
    ("train-lr-0", ["train.optimizer.lr=0"], f"train.optimizer.lr=0: allowed {LR}"),
    ("method-lr-nan", ["method.optimizer.lr=nan"], f"method.optimizer.lr=nan: allowed {LR}"),
    ("method-lr-inf", ["method.optimizer.lr=inf"], f"method.optimizer.lr=inf: allowed {LR}"),
    ("train-batch-0", ["train.batch_size=0"], "train.batch_size=0: allowed an integer >= 1"),
    ("method-batch-0", ["method.batch_size=0"], "method.batch_size=0: allowed an integer >= 1"),
    ("method-epochs-0", ["method.epochs=0"], "method.epochs=0: allowed an integer >= 1 (0 trains nothing and is refused)"),
    ("method-epochs-float", ["method.epochs=1.5"],
     "method.epochs=1.5: allowed an integer >= 1 (0 trains nothing and is refused)"),
    ("image-size-0", ["data.image_size=0"], "data.image_size=0: allowed null (the data's own size) or an integer >= 1"),
    ("pad-negative", ["data.augment.pad=-1"], "data.augment.pad=-1: allowed an integer >= 0 (pixels of random shift)"),
    ("small-stem", ["backbone.small_stem=maybe"], "backbone.small_stem='maybe': allowed auto, true, false"),
    ("reference", ["reference=maybe"], "reference='maybe': allowed retrain, none"),
    ("checkpoint-missing", ["original_checkpoint=nope.pt"], "original_checkpoint='nope.pt': file not found"),
    ("augment-scalar", ["data.augment=3"], "data.augment=3: allowed a mapping {pad: <pixels>, flip: <bool>}"),
    ("group-scalar", ["eval=3"], "eval=3: allowed a mapping of the eval group's keys (choose an option with "
                                 "eval=<name>, set keys with eval.<key>=<value>)"),
    ("no-optimizer", ["method.optimizer=null"],
     "method.optimizer=None: allowed an optimizer node with a _target_ (the method trains)"),
    ("torch-refuses", ["train=sgd", "train.optimizer.momentum=-1"],
     "train.optimizer: ValueError: Invalid momentum value: -1"),
    ("scheduler-value", ["train.scheduler.T_max=abc"],
     "train.scheduler: TypeError: unsupported operand type(s) for -: 'int' and 'str'"),
    ("bad-interpolation", ["seed=${oops}"], "seed: Interpolation key 'oops' not found"),
    ("target-missing", ["method._target_=nope.Nope"],
     "method._target_='nope.Nope': cannot be imported (ModuleNotFoundError(\"No module named 'nope'\"))"),
    ("forget-kind", ["forget.kind=nope"], "forget.kind='nope': allowed classes, random, indices"),
    # the forget set
    ("k-0-random", ["forget=random", "forget.k=0"], "forget.k=0: allowed null or an integer >= 1"),
    ("k-0-synthetic", ["data=synthetic", "forget.k=0"],
     "forget.k=0: must be an integer in 1..9 (the data has 10 classes and one must remain)"),
    ("k-abc", ["forget.k=abc"], "forget.k='abc': allowed null or an integer >= 1"),
    ("k-all-classes", ["data=synthetic", "forget.k=10"],
     "forget.k=10: must be an integer in 1..9 (the data has 10 classes and one must remain)"),
    ("fraction-0", ["forget.fraction=0"], "forget.fraction=0: allowed null or a fraction in (0, 1)"),
    ("fraction-1.5", ["forget=random", "forget.fraction=1.5"], "forget.fraction=1.5: allowed null or a fraction in (0, 1)"),
    ("k-and-fraction", ["forget.k=2", "forget.fraction=0.1"],
     "forget.k=2 and forget.fraction=0.1: give one of them, not both"),
    ("classes-twice", ["forget.classes=[1,1]"], "forget.classes=[1, 1]: class 1 is listed twice"),
    ("classes-range", ["data=synthetic", "forget.classes=[3,12]"], "forget.classes=[3, 12]: ids must lie in 0..9 (got [12])"),
    ("classes-negative", ["forget.classes=[-1]"], "forget.classes=[-1]: ids must be >= 0 (got [-1])"),
    ("indices-no-path", ["forget=indices"],
     "forget=indices needs forget.path=<file>: training-sample ids, one a line or a JSON list"),
    ("indices-missing-file", ["forget=indices", "forget.path=nope.txt"],
     "forget.path='nope.txt': file not found (one training-sample id per line)"),
    # eval and callbacks (the existing checks, in the same pass)
    ("eval-mia", ["eval.mia=nope"], "eval.mia='nope': allowed confidence, entropy"),
    ("eval-umia", ["eval.umia=nope"], "eval.umia='nope': allowed none, lira"),
    ("eval-embedding", ["eval.embedding=umap"], "eval.embedding='umap': allowed tsne, none"),
    ("eval-draws", ["eval.mia_draws=-1"], "eval.mia_draws=-1: allowed 0 (all samples, balanced) or a number of draws >= 1"),
    ("lira-shadows", ["eval.umia=lira", "eval.lira.shadows=1"],
     "eval.lira.shadows=1: allowed an integer >= 2 (every example needs IN and OUT shadows)"),
    ("forget-target", ["callbacks.forget_target=2"],
     "callbacks.forget_target=2: allowed null, retrain or an accuracy in [0, 1]"),
    ("forget-target-no-ref", ["callbacks.forget_target=retrain", "reference=none"],
     "callbacks.forget_target=retrain needs the retrained model: reference=none (set reference=retrain)"),
    ("max-epochs", ["callbacks.max_epochs=0"],
     "callbacks.max_epochs=0: allowed null (the method's epochs) or an integer >= 1"),
    # the method's own checks, and rules between groups
    ("method-value", ["method=random_label", "method.relabel=nope"],
     "method.relabel='nope': allowed random_other, nearest_wrong"),
    ("method-vs-kind", ["method=mnemonic", "forget=random"],
     "forget=random: method Mnemonic handles forget=classes only"),
    ("ssd-no-val", ["method=ssd", "data.val_fraction=0"],
     "method=ssd with data.val_fraction=0: ssd walks method.alpha_grid on validation images "
     "(or set method.alpha_grid=null: the fixed alpha); set data.val_fraction > 0"),
    ("mnemonic-no-val", ["method=mnemonic", "data.val_fraction=0"],
     "method=mnemonic with data.val_fraction=0: mnemonic selects lambda1 and its sign on validation images "
     "(or set method.selection=codes); set data.val_fraction > 0"),
    ("dlfd-no-val", ["method=dlfd", "data.val_fraction=0"],
     "method=dlfd with data.val_fraction=0: dlfd monitors the forget score against validation images and "
     "restores the best-validation state; set data.val_fraction > 0"),
    ("ga-samples-no-val", ["method=grad_ascent", "forget=random", "data.val_fraction=0"],
     "method=grad_ascent with data.val_fraction=0: grad_ascent stops sample forgetting at the original's "
     "validation accuracy (or set method.stop_forget_acc=null); set data.val_fraction > 0"),
    ("target-no-val", ["callbacks.forget_target=0.1", "data.val_fraction=0"],
     "callbacks.forget_target with data.val_fraction=0: the check images are the forget classes' validation "
     "images; set data.val_fraction > 0"),
    ("tune-no-val", ["experiment=tune", "data.val_fraction=0"],
     "tune with data.val_fraction=0: tuning scores validation images only; set data.val_fraction > 0"),
    ("tune-objective", ["experiment=tune", "tune.objective=nope"], "tune.objective='nope': allowed acc_gap, forget_gap"),
]


def matches(line: str, pattern: str) -> bool:
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), line) is not None


@pytest.fixture
def no_training(monkeypatch):
    """Any training (original, reference, shadows) fails the test."""
    monkeypatch.setattr(R, "fit_supervised", lambda *a, **k: pytest.fail("trained before refusing"))


@pytest.mark.parametrize("overrides, line", [pytest.param(o, ln, id=i) for i, o, ln in BAD])
def test_bad_input_is_one_line(tiny, tmp_path, no_training, overrides, line):
    cfg = tiny(*overrides)
    with pytest.raises(ConfigError) as err:
        R.build(cfg)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and matches(lines[0], line), lines
    assert not (tmp_path / "cache").exists() and not list(tmp_path.rglob("metrics.json"))


def test_several_problems_are_reported_at_once_one_line_each(tiny):
    found = problems(tiny("+train.epoch=5", "+forget.kk=3", "seed=1.5", "data.val_fraction=1.5"))
    assert len(found) == 4
    assert [ln.split(":")[0].split("=")[0] for ln in found] == ["train.epoch", "forget.kk", "seed", "data.val_fraction"]
    with pytest.raises(ConfigError) as err:
        validate(tiny("+train.epoch=5", "+forget.kk=3"))
    assert len(str(err.value).splitlines()) == 2


def test_an_interpolated_value_is_reported_once_where_it_comes_from(tiny):
    found = problems(tiny("seed=1.5"))  # forget.seed, method.seed, eval.mia_seed are ${seed}
    assert found == [f"seed=1.5: allowed {SEED}"]
    assert problems(tiny("method=retrain", "train.epochs=abc")) == [f"train.epochs='abc': allowed {LIFT}"]


@pytest.mark.parametrize("overrides", [
    [],
    ["+trainer.max_steps=3", "+trainer.limit_train_batches=2"],  # what tests add
    ["+method.optimizer.nesterov=true"],  # SGD's own parameter
    ["+callbacks.swa={_target_: lightning.pytorch.callbacks.StochasticWeightAveraging, swa_lrs: 0.01}"],
    ["method.search.epochs='range(1, 3)'"],  # the tuner's block is free-form
    ["forget=indices", "forget.path=ids.txt"],
    ["data=synthetic", "forget.classes=[3,7]"],
])
def test_legitimate_keys_and_values_pass(tiny, tmp_path, overrides):
    (tmp_path / "ids.txt").write_text("1\n2\n")
    overrides = [o.replace("ids.txt", str(tmp_path / "ids.txt")) for o in overrides]
    assert problems(tiny(*overrides)) == []


@pytest.mark.parametrize("experiment", ["method_table", "forget_scaling", "forget_scaling_cifar100", "privacy", "tune"])
def test_every_shipped_experiment_passes(tmp_path, experiment):
    assert problems(compose_config([f"experiment={experiment}"], tmp_path)) == []


@pytest.mark.parametrize("method", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "method").glob("*.yaml")))
def test_every_method_yaml_passes(tiny, method):
    assert problems(tiny(f"method={method}")) == []


# -- checks that need the data or the network: still before any training, in milliseconds --------------------

LATE = [
    ("trainable-layer9", ["method=random_label", "method.freeze=true", "method.trainable=[layer9]"],
     "method.trainable=['layer9']: ['layer9'] are not modules of the backbone (*)"),
    ("weight-reset-layers", ["method=weight_reset", "method.scope=layers", "method.layers=[layer9]"],
     "method.layers=['layer9']: ['layer9'] are not modules of the backbone (*)"),
    ("gradcam-layer", ["method=snu", "method.gradcam_layer=layer9"],
     "method.gradcam_layer='layer9': allowed auto or a module of the backbone (*)"),
    ("vit-8px", ["backbone=test_vit", "backbone.small_stem=false"],
     "backbone cannot take 1x8x8 inputs: Input height (8) should be divisible by patch size (16)."),
    ("k-digits", ["forget.k=10"], "forget.k=10: must be an integer in 1..9 (the data has 10 classes and one must remain)"),
    ("k-0-digits", ["forget.k=0"], "forget.k=0: must be an integer in 1..9 (the data has 10 classes and one must remain)"),
    ("random-one-sample", ["forget=random", "forget.k=1"],
     "forget=random with forget.k=1: 1 of 1295 training samples; need at least 2"),
    ("random-tiny-fraction", ["forget=random", "forget.fraction=0.0001"],
     "forget=random with forget.fraction=0.0001: 1 of 1295 training samples; need at least 2"),
    ("indices-twice", ["forget=indices", "forget.path=IDS"], "forget.path='IDS': id 7 is listed twice (each training sample once)"),
    ("indices-range", ["forget=indices", "forget.path=IDS2"], "forget.path='IDS2': ids must lie in 0..1437 (got [5000])"),
]


@pytest.mark.parametrize("overrides, line", [pytest.param(o, ln, id=i) for i, o, ln in LATE])
def test_checks_that_need_data_or_network_come_before_any_training(tiny, tmp_path, no_training, overrides, line):
    ids, ids2 = tmp_path / "ids.txt", tmp_path / "ids2.txt"
    ids.write_text("3\n7\n9\n7\n")
    ids2.write_text("[1, 5000]")
    overrides = [o.replace("IDS2", str(ids2)).replace("IDS", str(ids)) for o in overrides]
    line = line.replace("IDS2", str(ids2)).replace("IDS", str(ids))
    with pytest.raises(ConfigError) as err:
        R.build(tiny(*overrides))
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and matches(lines[0], line), lines


# -- the command line ---------------------------------------------------------------------------------------


def mu_runner(*args: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([sys.executable, "-m", "mu_runner", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


# Refused before any work: `main()` in this process gives the same exit code and lines without a new
# interpreter's imports (test_cli.py runs the same kind of refusal as a real process).
@pytest.mark.parametrize("args, last", [
    (["train.epochs=abc"], f"mu_runner: error: train.epochs='abc': allowed {LIFT}"),
    (["seed=1.5", "forget.seed=abc", "data.val_fraction=1.5", "train.optimizer.lr=-1", "+forget.kk=3"],
     f"mu_runner: error: forget.seed='abc': allowed {SEED}"),
    (["method=ssd", "data.val_fraction=0"], "mu_runner: error: method=ssd with data.val_fraction=0: ssd walks "
     "method.alpha_grid on validation images (or set method.alpha_grid=null: the fixed alpha); set data.val_fraction > 0"),
], ids=["one-problem", "five-problems", "cross-field"])
def test_command_line_bad_input_exit_code_2_one_line_each_nothing_written(tmp_path, args, last):
    res = main_in_process(*TINY, *args, f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("mu_runner: error:")]
    assert res.stderr.rstrip().splitlines()[-1] == last
    assert len(errors) == (5 if len(args) == 5 else 1)
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "outputs" / "cache").exists()
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.safetensors"))


def test_hydra_full_error_gives_the_traceback(tmp_path):
    res = main_in_process(*TINY, "train.epochs=abc", f"paths.root_dir={tmp_path}", cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert res.returncode != 0 and "Traceback" in res.stderr and "train.epochs='abc'" in res.stderr


HYDRA_REFUSALS = [
    (("method=nope",), r"Could not find 'method/nope'; available options in 'method': .*finetune, .*salun"),
    (("data.nope=3",), r"Could not override 'data\.nope'.*\+data\.nope=3"),
    (("+x=[1",), r"no viable alternative at input '\[1'"),
    (("-m", "method=finetune,nope"), r"Could not find 'method/nope'"),
]


@pytest.mark.parametrize("args, pattern", HYDRA_REFUSALS, ids=[" ".join(a) for a, _ in HYDRA_REFUSALS])
def test_hydra_own_refusals_are_one_line_and_exit_code_2(tmp_path, args, pattern):
    """What Hydra refuses while composing (an unknown group option or key, bad override syntax) ends
    like every other bad input: one line, exit code 2, nothing written."""
    res = mu_runner(*args, f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mu_runner: error: "), res.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in res.stderr + res.stdout and not list(tmp_path.rglob("*.json"))
    full = mu_runner(*args, f"paths.root_dir={tmp_path}", cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr  # Hydra's full report when asked for


def test_one_line_keeps_hydra_message_and_drops_its_detail():
    from mu_runner.__main__ import one_line
    text = ("In 'config': Could not find 'method/nope'\n\nAvailable options in 'method':\n\tfinetune\n\tsalun\n"
            "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n")
    assert one_line(text) == ("In 'config': Could not find 'method/nope'; available options in 'method': "
                              "finetune, salun")
    assert one_line("Could not override 'a.b'.\nKey 'b' is not in struct\n    full_key: a.b\n    object_type=dict") \
        == "Could not override 'a.b'; Key 'b' is not in struct"


def test_a_multirun_job_with_bad_input_writes_only_its_error_file(tmp_path):
    from mu_runner.sweeps import failed_jobs
    sweep = tmp_path / "sweep"
    res = main_in_process("-m", *TINY, "train.epochs=abc,0", f"paths.root_dir={tmp_path}",
                          f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode == 1
    failed, total = failed_jobs(sweep)
    assert total == 2 and sorted(failed) == [
        ("train.epochs=0", f"ConfigError: train.epochs=0: allowed {LIFT}"),
        ("train.epochs=abc", f"ConfigError: train.epochs='abc': allowed {LIFT}")]
    assert not (tmp_path / "outputs" / "cache").exists() and not list(sweep.rglob("metrics.json"))
    assert len(list(sweep.rglob("error.txt"))) == 2 and (sweep / "failed_jobs.txt").is_file()


def test_validation_is_fast(tiny):
    import time
    cfg = tiny()
    start = time.perf_counter()
    validate(cfg)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("method", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "method").glob("*.yaml")))
def test_every_method_yaml_passes_the_network_check(tiny, method):
    from mu_runner.validate import check_network
    cfg = tiny(f"method={method}")
    check_network(cfg, R.load_data(cfg))
