"""Real Airflow services on this machine, the way users run them: PostgreSQL, ``api-server``, ``scheduler``,
``dag-processor`` and ``triggerer`` (LocalExecutor), each its own process group, on free loopback ports.

Used by the live test suite (``tests/live/``), the demo's ``--serve`` mode and the fan-out benchmark::

    with LiveAirflow(workdir, dags_folder, env={"HF_ENDPOINT": hub.url}) as live:
        live.unpause("mmprep_demo")
        run_id = live.trigger("mmprep_demo", {"dataset_output_root": "/data/x"})
        assert live.wait_run("mmprep_demo", run_id) == "success"

The database is a throw-away PostgreSQL cluster (Debian's ``postgresql`` package: ``initdb``/``pg_ctl``),
created under ``workdir`` and stopped with the services. Everything this starts is stopped by
:meth:`LiveAirflow.stop` (SIGTERM to each process group, SIGKILL after a grace period, ``pg_ctl stop``),
which the context manager and an ``atexit`` hook both call, so a failing test or an interrupted run leaves
nothing behind. :meth:`LiveAirflow.log_tails` gives the last lines of every service's log for error messages.

Only public interfaces are used to talk to the services: the REST API v2 (:meth:`api`), the ``airflow``
CLI (:meth:`airflow`) and whatever the caller runs against :attr:`LiveAirflow.base_url`.
"""

from __future__ import annotations

import atexit
import compileall
import functools
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from ..procutil import die_with_parent

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
TERMINAL_RUN_STATES = ("success", "failed")
USERNAME = "admin"
PASSWORD = "mmprep-live-admin"


class LiveAirflowError(RuntimeError):
    """A service did not start or a wait ran out; the message carries the services' log tails."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL server binaries (``/usr/lib/postgresql/N/bin``), else ``initdb`` on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class PostgresCluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with trust auth, fsync off (test data only).

    PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user (created by
    Debian's package) and its folder lives directly under the system temp dir, where that user can reach it.
    """

    def __init__(self, port: int | None = None, database: str = "airflow") -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise LiveAirflowError("PostgreSQL server binaries not found (Debian: apt-get install -y postgresql)")
        self.bindir = bindir
        self.port = port or free_port()
        self.database = database
        self.dir: Path | None = None
        self._as: list[str] = []
        self._uid: int | None = None
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise LiveAirflowError(f"{' '.join(args)} failed ({result.returncode}): "
                                   f"{(result.stdout + result.stderr)[-2000:]}")
        return result

    def start(self) -> "PostgresCluster":
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="mmprep-pg-"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise LiveAirflowError("running as root needs the 'postgres' user (Debian's postgresql "
                                       "package creates it)") from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        data = self.dir / "data"
        self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "postgres.log"), "-w",
                  "-o", options, "start")
        self.running = True
        self._run(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                  self.database)
        return self

    def log_tail(self, lines: int = 40) -> str:
        log = self.dir / "postgres.log" if self.dir else None
        return _tail(log, lines) if log else ""

    def stop(self) -> None:
        if self.running and self.dir is not None:
            subprocess.run([*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast",
                            "-w", "stop"], capture_output=True, timeout=60)
            self.running = False
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C in the main thread (KeyboardInterrupt), so ``finally`` blocks, pytest's
    session teardown and ``atexit`` stop what we started when a CI runner or a user terminates the process
    (a SystemExit raised inside a test would only fail that test)."""
    import threading

    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def interrupt(number: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {number}")

        signal.signal(signal.SIGTERM, interrupt)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 500 * lines))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class LiveAirflow:
    """PostgreSQL + the four Airflow services, with REST/CLI helpers; see the module docstring.

    ``dags_folder`` holds the DAG files (copy ``dags/mmprep_dags.py`` there with the pipeline YAMLs);
    ``env`` is added to every service's environment (so also to the task processes LocalExecutor starts),
    e.g. ``HF_ENDPOINT`` or ``MMPREP_DEMO_ROOT``; ``airflow_config`` adds ``AIRFLOW__SECTION__KEY`` values.
    """

    def __init__(self, workdir: str | Path, dags_folder: str | Path, env: dict[str, str] | None = None,
                 airflow_config: dict[str, str] | None = None, parallelism: int = 4,
                 port: int | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.dags_folder = Path(dags_folder).resolve()
        self.home = self.workdir / "airflow_home"
        self.logs = self.workdir / "service-logs"
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.extra_env = dict(env or {})
        self.airflow_config = dict(airflow_config or {})
        self.parallelism = parallelism
        self.postgres: PostgresCluster | None = None
        self.processes: dict[str, subprocess.Popen] = {}
        self._token: str | None = None
        self._session: Any = None
        self.env: dict[str, str] = {}

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> "LiveAirflow":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _environment(self) -> dict[str, str]:
        assert self.postgres is not None
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({USERNAME: PASSWORD}))
        config = {
            "CORE__EXECUTOR": "LocalExecutor", "CORE__LOAD_EXAMPLES": "False",
            "CORE__DAGS_FOLDER": str(self.dags_folder), "CORE__PARALLELISM": str(self.parallelism),
            "CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
            "CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "CORE__UNIT_TEST_MODE": "False",
            "DATABASE__SQL_ALCHEMY_CONN": self.postgres.url,
            "API__BASE_URL": self.base_url, "API__HOST": "127.0.0.1", "API__PORT": str(self.port),
            "API__WORKERS": "1",
            # ≥ 64 characters, fixed per start: every service must sign and check tokens with the same key
            "API_AUTH__JWT_SECRET": os.urandom(48).hex(),
            "LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),  # not served (--skip-serve-logs); unique
            "LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),  # anyway in case a caller serves them
            "LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
            # a new DAG file or YAML is picked up within seconds, not the default 5 minutes
            "DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            # the first task's first execution-API call can exceed the 5 s default on a busy 2-core machine
            "WORKERS__EXECUTION_API_TIMEOUT": "60",
            "SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
            "MMPREP__CONFIG_DIR": str(self.dags_folder),
        }
        config.update(self.airflow_config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__") and k != "AIRFLOW_HOME"}
        env.update({f"AIRFLOW__{key}": value for key, value in config.items()})
        env.update({"AIRFLOW_HOME": str(self.home), "PYTHONUNBUFFERED": "1", "NO_PROXY": "*", "no_proxy": "*",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                    "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 240) -> "LiveAirflow":
        """Create and migrate the database, start the four services, wait until the API answers and every
        DAG file in the folder is parsed. One start takes ~15–25 s on two cores."""
        atexit.register(self.stop)
        _interrupt_on_sigterm()
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        # Every task process imports this package afresh. Beside a source checkout with no bytecode cache
        # (editable install, PYTHONDONTWRITEBYTECODE set, as many images do) each mapped instance would
        # compile it from source, ~40 ms of CPU that a pip-installed package (compiled at install) never pays.
        compileall.compile_dir(REPO_ROOT / "airflow_provider_mmprep", quiet=2)
        self.postgres = PostgresCluster().start()
        self.env = self._environment()
        migrate = self.airflow("db", "migrate", check=False, timeout=300)
        if migrate.returncode != 0:
            raise LiveAirflowError(f"airflow db migrate failed:\n{(migrate.stdout + migrate.stderr)[-3000:]}")
        for service in SERVICES:
            args = {"api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.port)],
                    # their log servers bind every interface; the API server reads the log files directly
                    "scheduler": ["scheduler", "--skip-serve-logs"],
                    "triggerer": ["triggerer", "--skip-serve-logs"]}.get(service, [service])
            log = open(self.logs / f"{service}.log", "ab")  # noqa: SIM115 - the child owns it
            self.processes[service] = subprocess.Popen(
                [sys.executable, "-m", "airflow", *args], env=self.env, cwd=self.workdir, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, os.getpid(), signal.SIGTERM))
            log.close()
        deadline = time.monotonic() + timeout
        self._wait(lambda: self._get_ok("/api/v2/monitor/health"), deadline, "the API server to answer")
        self._token = None
        # the execution API's first request is slow (app start-up): take that hit here, not in a task
        self._get_ok("/execution/health")
        self.wait_parsed(deadline=deadline)
        return self

    def stop(self) -> None:
        """Stop every service (SIGTERM to its process group, SIGKILL after 20 s) and the database.

        A second SIGTERM/Ctrl-C while this runs (``timeout`` forwarding the signal it got, a user pressing
        Ctrl-C twice) is held off until the end: raised half-way, it left services and PostgreSQL running."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            self._stop()
            return
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._stop()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)

    def _stop(self) -> None:
        for service, process in list(self.processes.items()):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for service, process in list(self.processes.items()):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group too: task processes LocalExecutor forked, even if the leader exited
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
        self.processes.clear()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self._session is not None:
            self._session.close()
            self._session = None

    def check_alive(self) -> None:
        """Raise (with log tails) when a service process has exited."""
        dead = [f"{name} (exit {p.returncode})" for name, p in self.processes.items() if p.poll() is not None]
        if dead:
            raise LiveAirflowError(f"service(s) exited: {', '.join(dead)}\n{self.log_tails()}")

    def log_tails(self, lines: int = 40) -> str:
        """The last ``lines`` lines of each service's log (and PostgreSQL's), for error messages."""
        parts = []
        for service in SERVICES:
            parts.append(f"----- {service} ({self.logs / (service + '.log')}) -----\n"
                         f"{_tail(self.logs / f'{service}.log', lines)}")
        if self.postgres is not None:
            parts.append(f"----- postgresql -----\n{self.postgres.log_tail(lines // 2)}")
        return "\n".join(parts)

    def _wait(self, ready: Any, deadline: float, what: str, interval: float = 0.5) -> Any:
        while True:
            self.check_alive()
            value = ready()
            if value:
                return value
            if time.monotonic() > deadline:
                raise LiveAirflowError(f"timed out waiting for {what}\n{self.log_tails()}")
            time.sleep(interval)

    # ---- CLI -------------------------------------------------------------------------------------------
    def airflow(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run ``airflow ARGS`` against these services' database and config."""
        result = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, cwd=self.workdir,
                                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise LiveAirflowError(f"airflow {' '.join(args)} exited {result.returncode}:\n"
                                   f"{(result.stdout + result.stderr)[-3000:]}")
        return result

    # ---- REST API v2 -----------------------------------------------------------------------------------
    @property
    def token(self) -> str:
        if self._token is None:
            import requests

            reply = requests.post(f"{self.base_url}/auth/token", json={"username": USERNAME, "password": PASSWORD},
                                  timeout=60)
            reply.raise_for_status()
            self._token = reply.json()["access_token"]
        return self._token

    def _get_ok(self, path: str) -> bool:
        import requests

        try:
            return requests.get(f"{self.base_url}{path}", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    def api(self, method: str, path: str, expect: Iterable[int] | None = (200,), **kwargs: Any) -> Any:
        """Call ``/api/v2{path}`` with a bearer token; returns the JSON body (raises on an unexpected
        status, with the body). ``expect=None`` returns the ``requests.Response`` itself."""
        import requests

        if self._session is None:
            self._session = requests.Session()
            self._session.trust_env = False
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        reply = self._session.request(method, f"{self.base_url}/api/v2{path}", headers=headers, timeout=60,
                                      **kwargs)
        if expect is None:
            return reply
        if reply.status_code not in tuple(expect):
            raise LiveAirflowError(f"{method} /api/v2{path} → HTTP {reply.status_code}: {reply.text[:2000]}")
        return reply.json() if reply.content else None

    def import_errors(self) -> list[dict[str, Any]]:
        return self.api("GET", "/importErrors")["import_errors"]

    def dag_ids(self) -> set[str]:
        return {d["dag_id"] for d in self.api("GET", "/dags", params={"limit": 1000})["dags"]}

    def wait_parsed(self, dag_ids: Iterable[str] = (), deadline: float | None = None, timeout: float = 180) -> None:
        """Wait until the dag-processor has parsed every file of the DAG folder (and ``dag_ids`` exist).
        Import errors fail at once, with the error."""
        deadline = deadline or time.monotonic() + timeout
        wanted = set(dag_ids)
        files = {str(p) for p in self.dags_folder.glob("*.py")}

        def ready() -> bool:
            errors = self.import_errors()
            if errors:
                raise LiveAirflowError("DAG import errors:\n" + "\n".join(
                    f"{e['filename']}: {e['stack_trace'][-1500:]}" for e in errors))
            dags = self.api("GET", "/dags", params={"limit": 1000})["dags"]
            seen = {d["fileloc"] for d in dags}
            return files <= seen and wanted <= {d["dag_id"] for d in dags}

        self._wait(ready, deadline, f"the dag-processor to parse {sorted(files)}", interval=1)

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", params={"update_mask": "is_paused"}, json={"is_paused": False})

    def pause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", params={"update_mask": "is_paused"}, json={"is_paused": True})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})["dag_runs"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600) -> str:
        """Wait for the run to reach success or failed; returns that state."""
        def done() -> str | None:
            state = self.run_state(dag_id, run_id)
            return state if state in TERMINAL_RUN_STATES else None

        return self._wait(done, time.monotonic() + timeout, f"run {run_id} of {dag_id} to finish", interval=1)

    def task_instances(self, dag_id: str, run_id: str) -> dict[tuple[str, int], dict[str, Any]]:
        """``{(task_id, map_index): task instance JSON}`` of one run, every page of it (the API serves at
        most ``[api] maximum_page_limit``, 100 by default, per request)."""
        found: dict[tuple[str, int], dict[str, Any]] = {}
        while True:
            body = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                            params={"limit": 100, "offset": len(found), "order_by": "id"})
            found.update(((ti["task_id"], ti["map_index"]), ti) for ti in body["task_instances"])
            if not body["task_instances"] or len(found) >= body["total_entries"]:
                return found

    def task_log(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1, try_number: int = 1) -> str:
        """One try's log as text: each structured log event as a JSON line (messages, errors, tracebacks)."""
        body = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                        params={"map_index": map_index, "full_content": "true"})
        content = body.get("content") or []
        return "\n".join(item if isinstance(item, str) else json.dumps(item, default=str) for item in content)

    def asset_events(self, **params: Any) -> list[dict[str, Any]]:
        return self.api("GET", "/assets/events", params={"limit": 100, **params})["asset_events"]
