"""End a finished command without Python's module teardown.

With torch, Lightning, torchmetrics, timm and their dependencies loaded (about 4,900 modules), the
interpreter's final clean-up of its modules takes 2-3 s on a 2-core CPU machine after the work is
done (measured: `python -c "import mu_runner.run"` 13.9 s, the same ending in `os._exit(0)` 11.8 s).
A sweep pays that once per job process, DDP once per rank and rank 0 waits for its ranks to end.

`exit_now(code)` does what the interpreter's exit does that matters (the `atexit` functions:
logging's flush and close, multiprocessing's and W&B's clean-up; then stdout and stderr flushed) and
ends the process with `code`. When a thread that is not a daemon is still running, the interpreter
would wait for it: then it falls back to the ordinary `sys.exit`, so nothing is ever cut short.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_code(code: object) -> int:
    """SystemExit's code as the process's exit status: None 0, an int itself, anything else 1 (printed)."""
    if code is None:
        return 0
    if isinstance(code, int):  # True is 1, as for sys.exit
        return int(code)
    print(code, file=sys.stderr)
    return 1


def exit_now(code: object = 0) -> NoReturn:
    status = exit_code(code)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(status)  # the interpreter waits for it, as it always does
    atexit._run_exitfuncs()  # what Py_Finalize runs before its module teardown
    for stream in (sys.stdout, sys.stderr):
        # a closed stream or a broken pipe: nothing more can be said on it
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)
