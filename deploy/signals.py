"""Ctrl-C for masklet's commands, however they were started."""
from __future__ import annotations

import signal
import threading


def restore_ctrl_c() -> bool:
    """Make SIGINT raise KeyboardInterrupt in this process again if it started with SIGINT ignored.

    A shell starts the background jobs of a script (`masklet serve &`) with SIGINT ignored, and
    Python then leaves it ignored: `kill -INT`, what stops a masklet command like Ctrl-C, did
    nothing (measured: `masklet serve` and `masklet broker` still ran 180 s after it, from a test
    suite started as a background job). Servers install their handlers explicitly for this reason
    (uvicorn does). True when it changed the handler; only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return False
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return True
