"""`corral pipeline ...`: validate, run, status, list. Mounted by corral's CLI (the composition root)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _load(args):
    from pipelines.spec import load_spec

    return load_spec(args.spec, args.set)


def cmd_validate(args) -> None:
    from corral.plan import table

    spec = _load(args)  # includes the memory check: every step fits its accelerators
    print(f"{args.spec}: valid; steps in order: {' -> '.join(spec.order())}")
    if plans := spec.plan():
        print(table(plans))


def cmd_run(args) -> None:
    import ray

    from pipelines import dag
    from pipelines.spec import load_spec

    spec = _load(args)
    if args.dry_run and not os.environ.get("RAY_ADDRESS"):  # a plan needs MLflow, not a cluster
        print(dag.plan_table(dag.plan(spec, tuple(args.force)), spec))
        print("(no RAY_ADDRESS: resources not checked against a cluster)")
        return
    connect(ray)
    if args.resource_check:  # an autoscaling cluster may add nodes later: --no-resource-check
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        spec = load_spec(args.spec, args.set, cluster_nodes=nodes)
    if args.dry_run:
        print(dag.plan_table(dag.plan(spec, tuple(args.force)), spec))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `ray job stop`: unwind and mark runs KILLED
    results = dag.run_pipeline(spec, Path(args.spec).read_text(), tuple(args.force))
    if any(r.status == "failed" for r in results):
        sys.exit(1)


def connect(ray) -> None:
    """The cluster at RAY_ADDRESS (inside `ray job submit` too), else a running local one, else a
    new local one with max(8, cores) logical CPUs (see `corral up`)."""
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
    except ConnectionError:
        ray.init(num_cpus=max(8, os.cpu_count() or 1), log_to_driver=True)


def cmd_status(args) -> None:
    from pipelines import dag

    print(dag.status_table(args.run_id, args.experiment))


def cmd_list(args) -> None:
    from pipelines import dag

    print(dag.list_table(args.experiment))


def add_commands(sub) -> None:
    p = sub.add_parser("pipeline", help="validate and run pipeline specs on Ray").add_subparsers(
        dest="action", required=True)

    def spec_args(parser):
        parser.add_argument("spec", help="pipeline spec YAML, e.g. pipelines/specs/llama2-tiny.yaml")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a spec field, e.g. steps.pretrain.config.loop.max_steps=10")

    v = p.add_parser("validate", help="check a spec without touching a cluster")
    spec_args(v)
    v.set_defaults(func=cmd_validate)

    r = p.add_parser("run", help="run a spec on the Ray cluster (RAY_ADDRESS, or a local one)")
    spec_args(r)
    r.add_argument("--force", action="append", default=[], metavar="STEP", help="rerun STEP and its dependents")
    r.add_argument("--dry-run", action="store_true", help="print the plan (order, resources, reuse) and stop")
    r.add_argument("--no-resource-check", dest="resource_check", action="store_false",
                   help="skip checking requests against the nodes alive now (autoscaling clusters)")
    r.set_defaults(func=cmd_run)

    experiment = os.environ.get("CORRAL_EXPERIMENT")
    s = p.add_parser("status", help="the steps of a pipeline run (default: the latest)")
    s.add_argument("run_id", nargs="?")
    s.add_argument("--experiment", default=experiment)
    s.set_defaults(func=cmd_status)

    ls = p.add_parser("list", help="recent pipeline runs")
    ls.add_argument("--experiment", default=experiment)
    ls.set_defaults(func=cmd_list)
