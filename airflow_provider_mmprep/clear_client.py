"""``mmprep clear``'s client of Airflow's REST API: clear chosen task ids of one stage in one DAG run.

``airflow tasks clear`` has no map-index flag, and a run that selected tasks "50-99" maps task 50 at index
0, so task ids become map indices through the run's ``plan_<stage>`` XCom: the instances' arguments, read
by :func:`task_ids.instance_task`. It talks HTTP to the API server (``requests``) and imports no Airflow.
"""

from __future__ import annotations

from typing import Any

import requests

from .task_ids import compact_ranges, instance_task


class ClearError(Exception):
    """A refusal worth one line. ``usage``: the request was wrong (exit 2), else the server failed (exit 1)."""

    def __init__(self, message: str, usage: bool = True):
        self.usage = usage
        super().__init__(message)


class AirflowRestClient:
    """The three calls ``mmprep clear`` makes, on one ``requests`` session (a bearer token once known)."""

    def __init__(self, base_url: str, session: Any | None = None) -> None:
        self.base = base_url.rstrip("/")
        self.session = session if session is not None else requests.Session()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; ``requests.RequestException`` (no answer, or an answer that is not JSON) is the
        caller's to word, since it knows how the user points the client elsewhere."""
        return self.session.request(method, f"{self.base}{path}", **kwargs)

    def authenticate(self, token: str | None, username: str | None, password: str = "") -> None:
        """Use ``token``; without one, ask ``/auth/token`` for one with ``username``/``password`` (if given)."""
        if not token and username:
            reply = self._call("POST", "/auth/token", json={"username": username, "password": password},
                               timeout=30)
            if reply.status_code >= 400:
                raise ClearError(f"{self.base}/auth/token refused {username!r}: HTTP {reply.status_code}")
            token = reply.json()["access_token"]
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def planned_instances(self, dag_id: str, run_id: str, stage: str) -> list[dict[str, Any]]:
        """The ``plan_<stage>`` task's return value in that run: one arguments dict per map index."""
        reply = self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/plan_{stage}"
                                  "/xcomEntries/return_value", params={"deserialize": "true"}, timeout=30)
        if reply.status_code >= 400:
            raise ClearError(f"cannot read the plan of {stage} in run {run_id!r} of {dag_id!r} "
                             f"(HTTP {reply.status_code}): {reply.text[:300]}")
        return list(reply.json().get("value") or [])

    def clear_task_instances(self, dag_id: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        reply = self._call("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", json=body, timeout=60)
        if reply.status_code >= 400:
            raise ClearError(f"clearTaskInstances failed (HTTP {reply.status_code}): {reply.text[:500]}",
                             usage=False)
        return list(reply.json().get("task_instances", []))


def map_indices(instances: list[dict[str, Any]], wanted: list[int]) -> tuple[list[int], list[int]]:
    """(map indices of the ``wanted`` task ids, wanted task ids no instance ran) from a stage's plan."""
    missing = set(wanted)
    indices = []
    for index, kwargs in enumerate(instances):
        task_id, _ = instance_task(kwargs)
        if task_id in missing:
            indices.append(index)
            missing.discard(task_id)
    return indices, sorted(missing)


def clear_task_ids(client: AirflowRestClient, dag_id: str, run_id: str, stage: str, wanted: list[int], *,
                   dry_run: bool = False, only_failed: bool = False, downstream: bool = True
                   ) -> tuple[int, list[int]]:
    """Clear the instances of ``stage`` that ran task ids ``wanted`` in run ``run_id`` (and, with
    ``downstream``, the later stages); return (instances cleared, their map indices)."""
    indices, missing = map_indices(client.planned_instances(dag_id, run_id, stage), wanted)
    if missing:
        raise ClearError(f"task ids {compact_ranges(missing)} of {stage} did not run in {run_id!r}")
    body = {"dry_run": dry_run, "only_failed": only_failed, "dag_run_id": run_id,
            "task_ids": [[stage, i] for i in indices], "include_downstream": downstream, "reset_dag_runs": True}
    return len(client.clear_task_instances(dag_id, body)), indices
