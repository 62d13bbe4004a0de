"""die_with_parent: a worker really ends when its task process is SIGKILLed, by either mechanism."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from airflow_provider_mmprep.procutil import die_with_parent

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

PARENT = textwrap.dedent("""\
    import functools, multiprocessing, os, signal, subprocess, sys, time
    from airflow_provider_mmprep import procutil

    def child(parent, ready, mechanism):
        if mechanism == "watchdog":  # as where prctl is missing
            procutil._set_parent_death_signal = lambda sig: False
        procutil.die_with_parent(parent)
        ready.set()
        time.sleep(600)

    if __name__ == "__main__":
        start, mechanism = sys.argv[1], sys.argv[2]
        if start == "exec":  # a subprocess's preexec_fn, as the live Airflow harness starts its services
            worker = subprocess.Popen(
                [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(600)"],
                stdout=subprocess.PIPE, preexec_fn=functools.partial(procutil.die_with_parent, os.getpid(),
                                                                     signal.SIGTERM))
            assert worker.stdout.readline() == b"ready\\n"
        else:
            context = multiprocessing.get_context(start)
            ready = context.Event()
            worker = context.Process(target=child, args=(os.getpid(), ready, mechanism))
            worker.start()
            assert ready.wait(120)
        print(worker.pid, flush=True)
        time.sleep(600)
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init, which may be slow to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize(("start", "mechanism"), [("fork", "prctl"), ("spawn", "prctl"), ("fork", "watchdog"),
                                                  ("exec", "prctl")])
def test_the_worker_dies_when_its_parent_is_sigkilled(tmp_path: Path, start: str, mechanism: str) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), start, mechanism], stdout=subprocess.PIPE, env=ENV)
    worker = None
    try:
        worker = int(parent.stdout.readline())
        assert _running(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60  # a generous bound on "soon", not a speed requirement
        while _running(worker):
            assert time.monotonic() < deadline, f"worker {worker} outlived its SIGKILLed parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        if worker is not None and _running(worker):  # the test failed: leave no orphan behind
            os.kill(worker, signal.SIGKILL)


def test_a_parent_already_gone_means_the_signal_at_once() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: no process has this pid now
    result = subprocess.run([sys.executable, "-c", "from airflow_provider_mmprep.procutil import die_with_parent\n"
                             f"die_with_parent({dead.pid})\nprint('survived')"],
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == -signal.SIGKILL and "survived" not in result.stdout


def test_a_live_process_that_is_not_the_parent_is_refused() -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(ValueError, match=f"process {other.pid} is not the parent"):
            die_with_parent(other.pid)
    finally:
        other.kill()
        other.wait()
