"""exit_now (mu_runner/utils/fastexit.py): the status as sys.exit would give it, atexit functions and
buffered output not lost, a running non-daemon thread waited for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mu_runner.utils.fastexit import exit_code

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT)}, check=False)


@pytest.mark.parametrize("code, status", [(None, 0), (0, 0), (2, 2), (True, 1), ("bad", 1)])
def test_exit_code_is_what_sys_exit_would_give(code, status, capsys):
    assert exit_code(code) == status
    assert capsys.readouterr().err == ("bad\n" if code == "bad" else "")


def test_atexit_functions_run_and_buffered_output_is_flushed(tmp_path):
    res = python("import atexit, sys\n"
                 "from mu_runner.utils.fastexit import exit_now\n"
                 "atexit.register(lambda: open('atexit.txt', 'w').write('ran'))\n"
                 "sys.stdout.write('buffered, no newline')\n"
                 "exit_now(3)\n", tmp_path)
    assert res.returncode == 3 and res.stdout == "buffered, no newline"
    assert (tmp_path / "atexit.txt").read_text() == "ran"


def test_a_running_non_daemon_thread_is_waited_for(tmp_path):
    res = python("import threading, time\n"
                 "from mu_runner.utils.fastexit import exit_now\n"
                 "threading.Thread(target=lambda: (time.sleep(0.5), open('thread.txt', 'w').write('done'))).start()\n"
                 "exit_now(0)\n", tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "thread.txt").read_text() == "done"
