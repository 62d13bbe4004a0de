"""The provider without running a DAG: registration, [mmprep] options, DAG parsing, pods, plan, clear."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jinja2
import pytest

import importlib.util  # noqa: E402

# find_spec, not importorskip: airflow must not be imported before airflow_home() sets AIRFLOW_HOME
if any(importlib.util.find_spec(m.split(".")[0]) is None for m in ("airflow", "airflow.providers.cncf.kubernetes")):
    pytest.skip("needs the airflow/kubernetes/precache extras", allow_module_level=True)

from airflow_provider_mmprep.testing.airflow_env import DAGS_FOLDER, airflow_home  # noqa: E402

airflow_home(migrate=False)  # parsing and pods need no DB

from airflow_provider_mmprep import get_provider_info  # noqa: E402
from airflow_provider_mmprep.cli import main as mmprep_main  # noqa: E402
from airflow_provider_mmprep.config import ConfigError  # noqa: E402
from airflow_provider_mmprep.airflow.settings import ClusterDefaults  # noqa: E402
from airflow_provider_mmprep.task_ids import instance_kwargs  # noqa: E402
from airflow_provider_mmprep.task_mapping import (check_fan_out, parse_task_ids, plan_run,  # noqa: E402
                                                  read_dag_spec)

REPO = Path(__file__).resolve().parents[1]


def test_provider_info_is_complete_and_lists_config_options() -> None:
    info = get_provider_info()
    assert info["package-name"] == "airflow-provider-mmprep"
    options = info["config"]["mmprep"]["options"]
    for name in ("worker_image", "namespace", "pvc_claim_name", "pvc_mount_path", "gpu_resource_name",
                 "gpu_count", "node_selector", "tolerations", "service_account_name", "in_cluster",
                 "kube_config_file"):
        assert name in options and "default" in options[name]
    assert info["connection-types"][0]["connection-type"] == "mmprep_hf"
    from airflow_provider_mmprep.hooks.hf import HuggingFaceHubHook
    assert HuggingFaceHubHook.conn_type == "mmprep_hf"


def test_entry_point_in_built_wheel(tmp_path: Path) -> None:
    """Build the wheel (not installed anywhere) and read its entry_points.txt as Airflow would find it."""
    source = tmp_path / "src"  # a copy, so the build leaves no egg-info in the repository
    shutil.copytree(REPO / "airflow_provider_mmprep", source / "airflow_provider_mmprep",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("airflow_provider_mmprep-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(name).decode()
    assert "[apache_airflow_provider]" in text
    assert "provider_info = airflow_provider_mmprep:get_provider_info" in text


def test_dagbag_imports_every_yaml_fast() -> None:
    from airflow.dag_processing.dagbag import DagBag

    started = time.perf_counter()
    bag = DagBag(str(DAGS_FOLDER))
    elapsed = time.perf_counter() - started
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"download_multimodal", "mmprep_demo"}
    production = bag.dags["download_multimodal"]
    assert {t.task_id for t in production.tasks} >= {"plan", "download_parquet", "download_images",
                                                      "reorganize_tar", "precache_encodings", "generate_wdinfo"}
    # Reported, not asserted as a threshold (2 shared cores): the target is < 0.3 s per YAML.
    yamls = len(bag.dag_ids)
    started = time.perf_counter()
    assert DagBag(str(DAGS_FOLDER)).import_errors == {}
    warm = time.perf_counter() - started
    print(f"\nDagBag parse of {yamls} YAMLs: first {elapsed / yamls:.3f} s per YAML (imports included), "
          f"then {warm / yamls:.3f} s per YAML (target < 0.3)")



def test_a_broken_yaml_does_not_hide_the_other_pipelines(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One loader file serves every YAML of the folder; an exception there would drop all its DAGs."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.delenv("AIRFLOW__MMPREP__CONFIG_DIR", raising=False)
    shutil.copy(DAGS_FOLDER / "mmprep_dags.py", tmp_path)
    demo = (DAGS_FOLDER / "demo_multimodal.yaml").read_text()
    shutil.copy(DAGS_FOLDER / "demo_multimodal.yaml", tmp_path)
    broken = demo.replace("name: mmprep_demo", "name: teammate's pipeline")
    (tmp_path / "teammate.yaml").write_text(broken)
    bag = DagBag(str(tmp_path))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"mmprep_demo", "mmprep_config_error__teammate"}
    assert {t.task_id for t in bag.dags["mmprep_demo"].tasks} >= {"plan", "download_images", "reorganize_tar"}
    stand_in = bag.dags["mmprep_config_error__teammate"]
    assert "run.name" in stand_in.description and "teammate.yaml" in stand_in.description
    with pytest.raises(ValueError, match=r"teammate\.yaml: .*run\.name: .* is not a valid DAG id"):
        stand_in.get_task("config_error").python_callable()



@pytest.mark.parametrize("wanted", ["mmprep_demo", "download_multimodal", "mmprep_config_error__teammate"])
def test_a_task_process_builds_only_its_own_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     wanted: str) -> None:
    """Every mapped instance parses the loader file; with Airflow's parsing context naming the DAG, the other
    YAMLs of the folder are not built (a broken one included), and the wanted one, broken or not, is."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.delenv("AIRFLOW__MMPREP__CONFIG_DIR", raising=False)
    for name in ("mmprep_dags.py", "demo_multimodal.yaml", "download_multimodal.yaml"):
        shutil.copy(DAGS_FOLDER / name, tmp_path)
    broken = (DAGS_FOLDER / "demo_multimodal.yaml").read_text().replace("name: mmprep_demo",
                                                                         "name: teammate's pipeline")
    (tmp_path / "teammate.yaml").write_text(broken)
    assert len(DagBag(str(tmp_path)).dag_ids) == 3
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", wanted)
    bag = DagBag(str(tmp_path))
    assert bag.import_errors == {} and set(bag.dag_ids) == {wanted}

def test_a_dags_folder_with_the_previous_loader_file_still_builds(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Users copied dags/mmprep_dags.py into their dags folder; the copy from before the airflow/ package
    imports airflow_provider_mmprep.dag_builder and must keep working after an upgrade."""
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.delenv("AIRFLOW__MMPREP__CONFIG_DIR", raising=False)
    (tmp_path / "mmprep_dags.py").write_text(
        '"""airflow DAG loader as shipped before."""\nfrom pathlib import Path\n\n'
        "from airflow.configuration import conf\n\n"
        "from airflow_provider_mmprep.dag_builder import load_dags\n\n"
        'load_dags(conf.get("mmprep", "config_dir", fallback="") or Path(__file__).parent, globals())\n')
    shutil.copy(DAGS_FOLDER / "demo_multimodal.yaml", tmp_path)
    bag = DagBag(str(tmp_path))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"mmprep_demo"}

def test_disabled_stage_absent_schedule_from_yaml_retries_with_backoff(tmp_path: Path) -> None:
    from airflow_provider_mmprep.airflow.dag import build_dag

    text = (DAGS_FOLDER / "demo_multimodal.yaml").read_text()
    path = tmp_path / "pipe.yaml"
    path.write_text(text.replace("reorganize_tar:\n  enable: True", "reorganize_tar:\n  enable: False")
                    .replace("name: mmprep_demo\n  schedule: null", "name: nightly\n  schedule: '@daily'"))
    dag = build_dag(path, _cluster())
    assert dag.dag_id == "nightly" and dag.schedule == "@daily"
    assert "reorganize_tar" not in dag.task_ids and "precache_encodings" in dag.task_ids
    precache = dag.get_task("precache_encodings")
    assert precache.partial_kwargs["retries"] == _cluster().retries == 2
    assert precache.partial_kwargs["retry_exponential_backoff"]


def _cluster() -> ClusterDefaults:
    return ClusterDefaults(
        worker_image="registry.example.com/mmprep-worker:1", namespace="data", service_account_name="mmprep",
        in_cluster=True, kube_config_file="", kubernetes_conn_id="", pvc_claim_name="dataset",
        pvc_mount_path="/data/mmprep", config_map_name="mmprep-configs",
        config_mount_path="/opt/airflow/dags/mmprep", gpu_resource_name="nvidia.com/gpu", gpu_count=2,
        gpu_pool="mmprep_gpu", node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        hf_token_secret="hf-token:token")


def test_kpo_pods_render_gpu_selector_tolerations_pvc_and_task_id() -> None:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from airflow_provider_mmprep.airflow.dag import build_dag
    from airflow_provider_mmprep.airflow.pods import pod_partial_kwargs

    config = DAGS_FOLDER / "download_multimodal.yaml"
    dag = build_dag(config, _cluster())
    mapped = dag.get_task("precache_encodings")
    assert mapped.partial_kwargs["pool"] == "mmprep_gpu"
    kwargs = pod_partial_kwargs("precache_encodings", _cluster())
    for task_id in (0, 3, 7):
        arguments = instance_kwargs("kubernetes", "precache_encodings", str(config), ["dataset_repo_id=a/b"],
                                    task_id, 8)["arguments"]
        op = KubernetesPodOperator(task_id="precache_encodings", arguments=arguments, **kwargs)
        pod = op.build_pod_request_obj(dry_run=True)
        container = pod.spec.containers[0]
        assert container.resources.limits["nvidia.com/gpu"] == "2"
        assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
        assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
        claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.spec.volumes
                  if v.persistent_volume_claim}
        assert claims == {"mmprep-dataset": "dataset"}
        assert {m.name: m.mount_path for m in container.volume_mounts}["mmprep-dataset"] == "/data/mmprep"
        command = container.command + container.args
        assert command[:3] == ["mmprep", "run", str(config)]
        assert command[command.index("--task-id") + 1] == str(task_id)
        assert command[command.index("--task-count") + 1] == "8"
        assert pod.spec.service_account_name == "mmprep"
        assert any(e.name == "HF_TOKEN" and e.value_from.secret_key_ref.name == "hf-token"
                   for e in container.env)
        label = jinja2.Template(kwargs["map_index_template"]).render(task=op)
        assert label == f"task {task_id}/8"


def test_task_id_params_and_fan_out_refusal() -> None:
    assert parse_task_ids("1-2", 4) == [1, 2]
    assert parse_task_ids(3, 4) == [3]
    assert parse_task_ids(None, 4) is None
    with pytest.raises(ConfigError, match="outside 0..3"):
        parse_task_ids("2-9", 4)
    with pytest.raises(ConfigError, match="max_map_length = 1024.*AIRFLOW__CORE__MAX_MAP_LENGTH=2000"):
        check_fan_out("precache_encodings", 2000, 1024)


def test_plan_refuses_large_fan_out_and_unsafe_params(tmp_path: Path) -> None:
    from conftest import launcher_with_models

    text = (DAGS_FOLDER / "download_multimodal.yaml").read_text().replace("node_array_size: 8\n  precache",
                                                                          "node_array_size: 5000\n  precache")
    # the example's precache_sd.yaml names placeholder weights, which the plan task refuses
    text = text.replace("${launcher_scripts_path}", str(launcher_with_models(tmp_path / "launcher")))
    path = tmp_path / "big.yaml"
    path.write_text(text)
    spec = read_dag_spec(path)
    params = {"dataset_repo_id": "org/name", "stages": ["precache_encodings"]}
    with pytest.raises(ConfigError, match="5000 mapped tasks exceed"):
        plan_run(spec, params, limit=1024)
    with pytest.raises(ConfigError, match="without interpolation"):
        plan_run(spec, {"dataset_repo_id": "${oc.env:SECRET}"}, limit=1024)


class _FakeApi(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict | None]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.requests.append(("GET", self.path, None))
        # a run that selected tasks 48..99: map index = task id - 48
        value = [{"stage_task_id": t, "stage_task_count": 100, "overrides": []} for t in range(48, 100)]
        self._reply({"key": "return_value", "value": value})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(("POST", self.path, body))
        self._reply({"task_instances": [{"task_id": t, "map_index": i} for t, i in body["task_ids"]],
                     "total_entries": len(body["task_ids"])})


def test_clear_posts_map_indices_of_the_chosen_task_ids(capsys: pytest.CaptureFixture[str]) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = mmprep_main(["clear", "download_multimodal", "manual__1", "--stage", "precache_encodings",
                            "--task-ids", "50-52,99", "--only-failed", "--token", "T",
                            "--api-url", f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    assert code == 0
    get, post = _FakeApi.requests
    assert get[1].startswith("/api/v2/dags/download_multimodal/dagRuns/manual__1/taskInstances/"
                             "plan_precache_encodings/xcomEntries/return_value")
    assert post[1] == "/api/v2/dags/download_multimodal/clearTaskInstances"
    assert post[2]["task_ids"] == [["precache_encodings", 2], ["precache_encodings", 3],
                                   ["precache_encodings", 4], ["precache_encodings", 51]]
    assert post[2]["dry_run"] is False and post[2]["only_failed"] is True
    assert post[2]["dag_run_id"] == "manual__1"
    assert "cleared 4 task instance(s)" in capsys.readouterr().out


def test_hf_connection_supplies_token_and_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_mmprep.hooks.hf import HuggingFaceHubHook

    monkeypatch.setenv("AIRFLOW_CONN_HF_MMPREP_TEST", json.dumps(
        {"conn_type": "mmprep_hf", "password": "hf_secret_token", "host": "http://127.0.0.1", "port": 1234}))
    assert HuggingFaceHubHook("hf_mmprep_test").get_env() == {"HF_TOKEN": "hf_secret_token",
                                                               "HF_ENDPOINT": "http://127.0.0.1:1234"}
    assert HuggingFaceHubHook("hf_not_defined").get_env() == {}  # public datasets need no connection
    secret = HuggingFaceHubHook.pod_secret("hf-token")
    assert (secret.secret, secret.key, secret.deploy_target) == ("hf-token", "token", "HF_TOKEN")


def test_clear_without_an_api_server_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = mmprep_main(["clear", "d", "r", "--stage", "precache_encodings", "--task-ids", "1", "--token", "T",
                        "--api-url", f"http://127.0.0.1:{port}"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot reach the Airflow API server at http://127.0.0.1:{port} (connection refused "
                   "or timed out); start it or pass --api-url (or set AIRFLOW_API_URL)"]


def test_mmprep_section_is_read_with_airflows_typed_getters(monkeypatch: pytest.MonkeyPatch) -> None:
    """[mmprep] through Airflow's conf: its booleans, integers and JSON, its refusals, and the defaults the
    provider declares where an option is not set (an empty JSON option means none)."""
    from airflow.exceptions import AirflowConfigException

    from airflow_provider_mmprep.airflow.settings import MMPREP_CONFIG_OPTIONS, option_default

    for option in MMPREP_CONFIG_OPTIONS:
        monkeypatch.delenv(f"AIRFLOW__MMPREP__{option.upper()}", raising=False)
    defaults = ClusterDefaults.from_airflow_config()
    assert (defaults.in_cluster, defaults.deferrable, defaults.gpu_count, defaults.retries) == (True, False, 1, 2)
    assert defaults.tolerations == json.loads(option_default("tolerations")) != []
    assert defaults.node_selector == {} and defaults.worker_image == option_default("worker_image")

    for name, value in {"IN_CLUSTER": "false", "DEFERRABLE": "t", "GPU_COUNT": "4", "RETRIES": "0",
                        "TOLERATIONS": "", "NODE_SELECTOR": '{"a": "b"}'}.items():
        monkeypatch.setenv(f"AIRFLOW__MMPREP__{name}", value)
    cluster = ClusterDefaults.from_airflow_config()
    assert (cluster.in_cluster, cluster.deferrable, cluster.gpu_count, cluster.retries) == (False, True, 4, 0)
    assert cluster.tolerations == [] and cluster.node_selector == {"a": "b"}

    for name, value, message in (("IN_CLUSTER", "maybe", '"in_cluster" key in "mmprep"'),
                                 ("GPU_COUNT", "two", '"gpu_count" key in "mmprep"'),
                                 ("WORKER_RESOURCES", "{cpu: 8}", r"\[mmprep\] 'worker_resources'")):
        with monkeypatch.context() as patch:
            patch.setenv(f"AIRFLOW__MMPREP__{name}", value)
            with pytest.raises(AirflowConfigException, match=message):
                ClusterDefaults.from_airflow_config()
    monkeypatch.setenv("AIRFLOW__MMPREP__NODE_SELECTOR", "[1]")
    with pytest.raises(ValueError, match=r"\[mmprep\] node_selector: expected a JSON dict, got \[1\]"):
        ClusterDefaults.from_airflow_config()
