"""Credentials (WANDB_API_KEY, *_KEY, *_TOKEN, *_SECRET, *_PASSWORD) never reach a run's files, logs or
reports, and no name a user chooses puts outputs outside the output directory."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from cli_runs import SMALL, command, main_in_process, run_cli

from mu_runner.utils import redact as R

API_KEY = "wandb-fake-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
TOKEN = "tok-9a8b7c6d5e4f3a2b1c0d"


@pytest.fixture
def fake_secrets(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    monkeypatch.setenv("MU_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("DB_PASSWORD", "hunter2-hunter2")
    monkeypatch.setenv("FEATURE_KEY", "1")  # too short to be a credential: never replaced


def test_which_variables_are_credentials(fake_secrets, monkeypatch):
    monkeypatch.setenv("AWS_SECRET", "abcdefgh-secret")
    monkeypatch.setenv("my_api_key", "lower-case-name-123")
    monkeypatch.setenv("KEYBOARD", "not-a-credential-name")
    names = {name for name, _ in R.secrets()}
    assert {"WANDB_API_KEY", "MU_TEST_TOKEN", "DB_PASSWORD", "AWS_SECRET", "my_api_key"} <= names
    assert "FEATURE_KEY" not in names and "KEYBOARD" not in names
    text = f"key {API_KEY} and {TOKEN}; seed=1"
    assert R.redact(text) == "key <redacted:WANDB_API_KEY> and <redacted:MU_TEST_TOKEN>; seed=1"
    assert R.redact_bytes(text.encode()) == R.redact(text).encode()


def test_config_values_are_redacted_by_value_and_by_key_name(fake_secrets):
    cfg = {"logger": {"notes": f"x{API_KEY}x", "api_key": "typed-in", "token": "", "save_dir": "/out"},
           "tags": [TOKEN, "digits"], "seed": 1, "label_key": "y"}
    clean = R.redact_obj(cfg)
    assert clean == {"logger": {"notes": "x<redacted:WANDB_API_KEY>x", "api_key": "<redacted>", "token": "",
                                "save_dir": "/out"},
                     "tags": ["<redacted:MU_TEST_TOKEN>", "digits"], "seed": 1, "label_key": "y"}


def test_log_handlers_redact_messages_and_tracebacks(fake_secrets, tmp_path):
    handler = logging.FileHandler(tmp_path / "x.log")
    handler.addFilter(R.RedactFilter())
    log = logging.getLogger("mu_runner.test_credentials")
    log.addHandler(handler)
    try:
        log.warning("token is %s", TOKEN)
        try:
            raise ValueError(f"bad key {API_KEY}")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
        handler.close()
    text = (tmp_path / "x.log").read_text()
    assert TOKEN not in text and API_KEY not in text
    assert "<redacted:MU_TEST_TOKEN>" in text and "bad key <redacted:WANDB_API_KEY>" in text


def test_the_writer_of_run_files_redacts(fake_secrets, tmp_path):
    from mu_runner.cache import atomic_write_json
    atomic_write_json(tmp_path / "m.json", {"notes": API_KEY})
    assert API_KEY not in (tmp_path / "m.json").read_text()


def _leaks(root: Path, values: tuple[str, ...]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        found += [f"name {path}" for v in values if v in path.name]
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path} holds {v[:6]}..." for v in values if v.encode() in data]
    return found


def test_a_run_whose_overrides_carry_credentials_writes_none_of_them(tmp_path):
    """W&B (offline) as the logger, its notes from ${oc.env:WANDB_API_KEY} and its group typed in
    literally: no file of the run directory (.hydra/, log, config.yaml, metrics.json, W&B's files)
    and no console line holds either value."""
    secrets = {"WANDB_API_KEY": API_KEY, "MU_TEST_TOKEN": TOKEN}
    res = run_cli(tmp_path, *SMALL, "reference=none", "logger=wandb", "+logger.notes=${oc.env:WANDB_API_KEY}",
                  f"logger.group={TOKEN}", **secrets)
    run = tmp_path / "run"
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "metrics.json").exists() and list(run.rglob("*.wandb"))
    assert "<redacted:WANDB_API_KEY>" in (run / "config.yaml").read_text()
    time.sleep(2)  # W&B's service may still be flushing its offline files
    assert _leaks(tmp_path, tuple(secrets.values())) == []
    assert API_KEY not in res.stdout + res.stderr and TOKEN not in res.stdout + res.stderr


def test_an_error_message_that_would_carry_a_credential_is_redacted(tmp_path):
    # refused before any work: main() in this process (cli_runs.main_in_process)
    res = main_in_process(*command(tmp_path, f"seed={TOKEN}", "logger=csv")[3:], cwd=tmp_path, MU_TEST_TOKEN=TOKEN)
    assert res.returncode == 2
    assert TOKEN not in res.stderr and "<redacted:MU_TEST_TOKEN>" in res.stderr
    assert (tmp_path / "run" / "mu_runner.log").exists()
    assert _leaks(tmp_path, (TOKEN,)) == []


def test_a_name_with_dotdot_stays_inside_the_sweep_directory():
    """A multirun job's directory is named by its overrides; '/' cannot survive in it, so '../' in a
    value (a forget-indices path, a run name) cannot climb out of the sweep directory."""
    from mu_runner.__main__ import _dirname

    for overrides in ("forget.path=../../../etc/x.json,seed=0", "logger.name=../..", "x=" + "../" * 200):
        name = _dirname(overrides)
        assert "/" not in name and name not in (".", "..") and len(name.encode()) <= 255
        assert (Path("/sweep") / name).resolve().parent == Path("/sweep")


def test_a_credential_typed_into_a_multirun_override_is_not_a_directory_name(fake_secrets):
    from mu_runner.__main__ import _dirname

    name = _dirname(f"logger.group={TOKEN},seed=0")
    assert TOKEN not in name and name == "logger.group=<redacted:MU_TEST_TOKEN>,seed=0"


def test_a_long_override_list_keeps_every_swept_value_in_the_directory_name():
    """Hydra sorts the overrides by key: cutting the joined list at the limit hid the values of the
    last keys (often the swept one). Keys lose their dotted prefixes first; the name stays unique."""
    from mu_runner.__main__ import _dirname

    fixed = ("callbacks.forget_target=retrain,data.image_size=16,experiment=forget_scaling,"
             "forget.classes=[3,4],method.optimizer.lr=0.01,method.ratio_per_class=0.02")
    names = {_dirname(f"{fixed},seed={s},train.optimizer.weight_decay=0.0005") for s in (0, 1)}
    assert len(names) == 2
    for name in names:
        assert len(name.encode()) <= 255 and "/" not in name
        assert "classes=[3,4]" in name and "lr=0.01" in name and "weight_decay=0.0005" in name
        assert ("seed=0" in name) != ("seed=1" in name)
    assert _dirname("method=salun,seed=3") == "method=salun,seed=3"  # short lists are kept as they are
