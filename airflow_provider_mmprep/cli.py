"""``mmprep``: validate a NeMo ``download_multimodal.yaml``, show its plan, run its stages locally.

Exit codes: 0 success, 1 a task failed (after writing what it could), 2 bad config or usage.
Pods and Airflow operators call ``mmprep run CONFIG --stage NAME --task-id N --task-count M``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

# pydantic looks for plugins among the entry points of every installed distribution when the first model
# is built: 70 ms of a pod's start-up beside Airflow's dependencies, for plugins this CLI never uses.
# An explicit PYDANTIC_DISABLE_PLUGINS (even empty) in the environment wins.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

# Only what a task needs is imported here: a task run from a resolved config (:mod:`.resolved`) never loads
# the config layer (pydantic), which the YAML path imports in _load.
from .configbase import STAGE_NAMES, ConfigError  # noqa: E402
from .stages import StageError, run_stage_task  # noqa: E402
from .task_ids import TASK_COUNT_FLAG, TASK_ID_FLAG, compact_ranges, parse_id_list  # noqa: E402

if TYPE_CHECKING:
    from .config import PipelineConfig

log = logging.getLogger("mmprep")

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE = 0, 1, 2


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _split_overrides(values: Sequence[str]) -> list[str]:
    bad = [v for v in values if "=" not in v]
    if bad:
        raise ConfigError([f"overrides: expected key=value, got {b!r}" for b in bad])
    return list(values)


def _load(args: argparse.Namespace, stages: list[str] | None = None) -> PipelineConfig:
    """The validated config: a YAML's, or a resolved config's (validated when it was written)."""
    from . import resolved

    if resolved.is_resolved_file(args.config):
        if args.overrides:
            raise ConfigError([f"overrides: {args.config} is a resolved config; give the overrides to "
                               f"mmprep validate when resolving it"])
        cfg = resolved.load_resolved(args.config)
        if "precache_encodings" in (stages or []) and cfg.precache is not None:
            _check_model_paths(cfg)
        return cfg  # type: ignore[return-value]
    from .config import load_config

    return load_config(args.config, _split_overrides(args.overrides), stages=stages)


def _check_model_paths(cfg: Any) -> None:
    """What load_config checks of the precache YAML on the machine that encodes (the weights are there), done
    where a resolved config (validated elsewhere, model paths only warned about) is run."""
    from .config import model_path_problems

    path = cfg.precache_encodings.precache_config_path
    placeholders, missing = model_path_problems(cfg.precache.real_model())
    problems = [f"{path}: {line}" for line in placeholders + missing]
    if problems:
        raise ConfigError(problems)


def cmd_validate(args: argparse.Namespace) -> int:
    from . import resolved

    if args.resolved_out and resolved.is_resolved_file(args.config):
        raise ConfigError([f"{args.config}: already a resolved config; validate the YAML it came from"])
    cfg = _load(args)
    print(f"{args.config}: valid; enabled stages: {', '.join(cfg.enabled_stages) or 'none'}")
    if args.resolved_out:
        out = resolved.write_resolved(cfg, args.resolved_out, _split_overrides(args.overrides))
        print(f"resolved config written to {out}: run tasks with mmprep run {out} --stage NAME "
              f"{TASK_ID_FLAG} N {TASK_COUNT_FLAG} M")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import build_plan

    plan = build_plan(_load(args))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return EXIT_OK
    print(f"DAG {plan.dag_id}")
    for number, stage in enumerate(plan.stages, 1):
        print(f"{number}. {stage.name}  [{stage.describe_tasks()}, runner {stage.runner}]")
        print(f"     in:  {stage.input}")
        print(f"     out: {stage.output}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    if (args.task_id is None) != (args.task_count is None):
        raise ConfigError(["--task-id and --task-count go together"])
    if args.task_count is not None and args.task_count < 1:
        raise ConfigError([f"--task-count: expected a positive integer, got {args.task_count}"])
    if args.task_id is not None and not 0 <= args.task_id < args.task_count:
        raise ConfigError([f"--task-id: {args.task_id} is outside 0..{args.task_count - 1} "
                           f"(--task-count {args.task_count})"])
    if args.task_id is not None and len(args.stage or []) != 1:
        raise ConfigError(["--task-id/--task-count need exactly one --stage"])
    cfg = _load(args, stages=args.stage or list(STAGE_NAMES))  # every stage named runs here, in this process
    if not cfg.enabled_stages:
        raise ConfigError([f"{args.config}: every stage is disabled (enable: false); nothing to run"])
    stages = args.stage or cfg.enabled_stages
    disabled = [s for s in stages if s not in cfg.enabled_stages]
    if disabled:
        raise ConfigError([f"{s}.enable: stage is disabled in this config; enable it to run it"
                           for s in disabled])
    results: dict[str, Any] = {}
    lines: list[str] = []
    status = EXIT_OK
    for name in [s for s in STAGE_NAMES if s in stages]:
        if args.task_id is not None:
            task_ids, task_count = [args.task_id], args.task_count
        else:
            from .plan import plan_stage

            stage_plan = plan_stage(cfg, name)
            if stage_plan.task_ids is None or stage_plan.task_count == 0:
                log.error("%s: nothing to do: no input found in %s", name, stage_plan.input)
                lines.append(f"{name}: not run: no input found in {stage_plan.input}")
                status = EXIT_TASK_FAILED
                break
            task_ids, task_count = stage_plan.task_ids, stage_plan.task_count
        log.info("%s: running tasks %s of %d", name, compact_ranges(task_ids), task_count)
        failed: list[int] = []
        summaries: list[dict[str, Any]] = []
        for task_id in task_ids:
            try:
                summaries.append(run_stage_task(cfg, name, task_id, task_count))
                results[f"{name}[{task_id}]"] = summaries[-1]
            except StageError as exc:
                log.error("%s: task %d/%d failed: %s", name, task_id, task_count, exc)
                failed.append(task_id)
            except Exception:  # keep going with the other tasks; the exit code reports it
                log.exception("%s: task %d/%d failed", name, task_id, task_count)
                failed.append(task_id)
        lines.append(summary_line(cfg, name, summaries, len(task_ids), failed))
        if failed:
            log.error("%s: %d task(s) failed: %s; rerun them with --stage %s --task-id N --task-count %d",
                      name, len(failed), compact_ranges(failed), name, task_count)
            status = EXIT_TASK_FAILED
            break
    if args.summary_json:
        print(json.dumps(results, indent=2, default=str))
    elif not args.quiet:
        print("\n".join(lines))
    return status


def summary_line(cfg: PipelineConfig, name: str, summaries: list[dict[str, Any]], tasks: int,
                 failed: list[int]) -> str:
    """One line per stage for the end of ``mmprep run``: where the output is, what was done or skipped."""
    block = cfg.stage(name)
    where = getattr(block, "output_dir", None) or getattr(block, "output_wdinfo_path", None)

    def total(key: str) -> int:
        return sum(int(s.get(key) or 0) for s in summaries)

    if not summaries:
        done = "no task finished"
    elif name == "download_parquet":
        done = f"{total('parts')} parquet part(s), {total('fetched_or_verified')} file(s) fetched or verified"
    elif name == "download_images":
        done = (f"{total('successes'):,} of {total('urls'):,} images; shards: {total('downloaded_shards')} "
                f"downloaded, {total('skipped_shards')} already complete, {total('redone_shards')} redone; "
                f"{total('retried_urls')} URL(s) retried")
    elif name == "reorganize_tar":
        done = (f"tars: {total('written')} written, {total('skipped_complete')} already complete "
                f"({summaries[0]['usable_samples']:,} samples in {summaries[0]['output_tars']} tar(s))")
    elif name == "precache_encodings":
        done = (f"tars: {total('encoded_tars')} encoded ({total('samples'):,} samples), "
                f"{total('already_done')} already done")
        if any(s.get("nothing_to_encode") for s in summaries):
            done += "; nothing to encode (only a short .INCOMPLETE tar)"
    else:
        done = f"{summaries[0]['full_tars']} full tar(s), {summaries[0]['total_key_count']:,} samples listed"
    state = f"{len(failed)} of {tasks} task(s) FAILED ({compact_ranges(failed)})" if failed else \
        f"{tasks} task(s) ok"
    return f"{name}: {state}; {done} -> {where}"


def cmd_report(args: argparse.Namespace) -> int:
    """Write the run report from what the stages left on disk (see :mod:`.report`)."""
    from .report import write_report  # matplotlib is imported only when a report is asked for

    cfg = _load(args, stages=[])  # runs no stage: model paths are not its business
    if not cfg.enabled_stages:
        raise ConfigError([f"{args.config}: every stage is disabled (enable: false); nothing to report"])
    path = write_report(cfg, args.out, overrides=args.overrides, dag_id=args.dag_id, run_id=args.run_id)
    print(path)
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe a shard folder or a wdinfo.pkl; exit 1 when it finds problems (damage, bad counts)."""
    from .inspection import format_report, inspect_path
    from .safepickle import UnsafePickleError
    from .storage import StorageError

    try:
        report = inspect_path(args.path, root=args.root, pickle_samples=args.pickle_samples)
    except (FileNotFoundError, UnsafePickleError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report, indent=2) if args.json else format_report(report, max_tars=args.max_tars))
    return EXIT_TASK_FAILED if report["problems"] else EXIT_OK


def cmd_clear(args: argparse.Namespace) -> int:
    """Clear chosen task ids of one stage in one DAG run via Airflow's REST API (see :mod:`.clear_client`)."""
    import requests

    from .clear_client import AirflowRestClient, ClearError, clear_task_ids

    try:
        wanted = parse_id_list(args.task_ids)
    except ValueError as exc:
        print(f"error: --task-ids: {exc}", file=sys.stderr)
        return EXIT_USAGE
    base = (args.api_url or os.environ.get("AIRFLOW_API_URL") or "http://localhost:8080").rstrip("/")
    client = AirflowRestClient(base, requests.Session())
    try:
        client.authenticate(args.token or os.environ.get("AIRFLOW_API_TOKEN"),
                            args.username or os.environ.get("AIRFLOW_API_USERNAME"),
                            os.environ.get("AIRFLOW_API_PASSWORD", ""))
        cleared, indices = clear_task_ids(client, args.dag_id, args.run_id, args.stage, wanted,
                                          dry_run=args.dry_run, only_failed=args.only_failed,
                                          downstream=not args.no_downstream)
    except ClearError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.usage else EXIT_TASK_FAILED
    except requests.RequestException as exc:
        reason = "connection refused or timed out" if isinstance(exc, requests.ConnectionError) \
            else type(exc).__name__
        print(f"error: cannot reach the Airflow API server at {base} ({reason}); start it or pass --api-url "
              "(or set AIRFLOW_API_URL)", file=sys.stderr)
        return EXIT_TASK_FAILED
    verb = "would clear" if args.dry_run else "cleared"
    print(f"{verb} {cleared} task instance(s): {args.stage} map indices {compact_ranges(indices)}"
          f"{' and downstream' if not args.no_downstream else ''}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mmprep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mmprep {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log lines (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    # the same flags after the subcommand (`mmprep run CFG -q`); SUPPRESS keeps a value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", help="NeMo-style download_multimodal.yaml (or a resolved config: "
                                      "mmprep validate --resolved-out)")
        p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. dataset_repo_id=org/name")
        return p

    p_validate = with_config(add("validate", help="check the config; one line per problem"))
    p_validate.add_argument("--resolved-out", metavar="FILE",
                            help="also write the validated config to FILE, which mmprep run takes in place of "
                                 "the YAML (tasks then skip validation and start faster)")
    p_validate.set_defaults(func=cmd_validate)
    p_plan = with_config(add("plan", help="show enabled stages, folders and task ids"))
    p_plan.add_argument("--json", action="store_true")
    p_plan.set_defaults(func=cmd_plan)
    p_run = with_config(add("run", help="run stages locally"))
    p_run.add_argument("--stage", action="append", choices=STAGE_NAMES, help="stage to run (repeatable)")
    p_run.add_argument(TASK_ID_FLAG, type=int)
    p_run.add_argument(TASK_COUNT_FLAG, type=int)
    p_run.add_argument("--summary-json", action="store_true", help="print task summaries as JSON")
    p_run.set_defaults(func=cmd_run)
    p_report = with_config(add("report", help="write report.html: counts, failures, plots, resume commands"))
    p_report.add_argument("--out", help="where to write it (default: report.html beside wdinfo.pkl)")
    p_report.add_argument("--dag-id", help="DAG id for the 'mmprep clear' lines (default: run.name)")
    p_report.add_argument("--run-id", help="DAG run id for the 'mmprep clear' lines")
    p_report.set_defaults(func=cmd_report)
    p_inspect = add("inspect", help="describe a shard folder or a wdinfo.pkl (no config needed)")
    p_inspect.add_argument("path", help="folder of .tar shards, or a wdinfo.pkl; a local path or a URL (s3://…, "
                           "credentials from the storage client's environment)")
    p_inspect.add_argument("--json", action="store_true", help="machine-readable report")
    p_inspect.add_argument("--root", help="dataset root for a wdinfo.pkl (default: its dataset_root or folder)")
    p_inspect.add_argument("--pickle-samples", type=int, default=1, help=".pickle members read per tar")
    p_inspect.add_argument("--max-tars", type=int, default=20,
                           help="per-tar lines shown (problems always; 0: all); --json lists every tar")
    p_inspect.set_defaults(func=cmd_inspect)
    p_clear = add("clear", help="clear chosen task ids of a stage in an Airflow DAG run (REST API)")
    p_clear.add_argument("dag_id")
    p_clear.add_argument("run_id")
    p_clear.add_argument("--stage", required=True, choices=STAGE_NAMES)
    p_clear.add_argument("--task-ids", required=True, help="stage task ids: 50-99 or 3,7,10-12")
    p_clear.add_argument("--only-failed", action="store_true", help="clear only failed instances")
    p_clear.add_argument("--dry-run", action="store_true", help="show what would be cleared")
    p_clear.add_argument("--no-downstream", action="store_true", help="do not clear later stages")
    p_clear.add_argument("--api-url", help="Airflow API server (default $AIRFLOW_API_URL or localhost:8080)")
    p_clear.add_argument("--token", help="API token (default $AIRFLOW_API_TOKEN)")
    p_clear.add_argument("--username", help="get a token with this user ($AIRFLOW_API_PASSWORD)")
    p_clear.set_defaults(func=cmd_clear)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`run CFG --stage x key=value`): argparse leaves those unparsed.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_TASK_FAILED
    except BrokenPipeError:  # `mmprep inspect ... | head`: the reader has what it wanted, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush is quiet
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
