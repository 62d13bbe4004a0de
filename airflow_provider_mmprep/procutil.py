"""Child processes that end with their parent: the one helper download and precache workers call.

A task killed outright (SIGKILL: a preempted pod, an OOM kill, ``kill -9``) runs no cleanup, so its worker
processes would live on as orphans, downloading or encoding into temporary files that the rerun has
already discarded. :func:`die_with_parent` makes the calling process receive a signal as soon as its
parent is gone.
"""

from __future__ import annotations

import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: How often the fallback watchdog (where prctl is missing) looks for its parent.
POLL_SECONDS = 1.0


def _set_parent_death_signal(sig: int) -> bool:
    """Linux: ask the kernel to send ``sig`` when the parent dies; False where that cannot be done."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig)) == 0
    except (OSError, AttributeError):
        return False


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Have this process receive ``sig`` when ``parent`` dies, even by SIGKILL.

    ``parent`` is the pid of the process that started this one, as that process saw it (``os.getpid()``
    passed in the child's arguments, or bound with :func:`functools.partial` for a ``preexec_fn``): a
    parent that died before this call is then noticed too, and this process gets ``sig`` at once.
    On Linux the kernel sends the signal (``PR_SET_PDEATHSIG``, which survives ``exec``; it fires when the
    *thread* that started this process ends, so start it from one that waits for it); elsewhere a daemon
    thread polls every ``POLL_SECONDS``. Raises ValueError when ``parent`` is alive but is not this
    process's parent (started through a fork server), which neither mechanism can watch.
    """
    if os.getppid() != parent:
        if _exists(parent):
            raise ValueError(f"process {parent} is not the parent of process {os.getpid()} "
                             f"(whose parent is {os.getppid()}): it cannot be watched")
        os.kill(os.getpid(), sig)  # already re-parented: the parent is gone
        return
    if _set_parent_death_signal(sig):
        if os.getppid() != parent:  # it died before the signal was armed
            os.kill(os.getpid(), sig)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="mmprep-parent-watchdog", daemon=True).start()
