"""The `rayrlhf` command line: one entry point, a sub-command per job kind.

Exit codes (docs/design.md): 0 success; 2 invalid input, with a short message naming the field,
file or line; 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from rayrlhf.config import load_config, to_yaml
from rayrlhf.errors import FailureBudgetExceeded, InvalidInput, Preempted, WorkersLost

log = logging.getLogger("rayrlhf")

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM with a checkpoint; run again with --resume


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job config (YAML)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set algorithm.kl_coef=0.05 (repeatable)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a config and print it resolved, defaults filled in; for online jobs also the actor plan."""
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    if cfg.algorithm.is_online:
        from rayrlhf.orchestrator.plan import check_plan

        sys.stdout.write("# actor plan:\n" + "".join(f"# {line}\n" for line in check_plan(cfg).describe().splitlines()))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """Each actor's memory on the cluster; exit 2 naming what does not fit and the smallest change that fits."""
    from rayrlhf.orchestrator.capacity_plan import Cluster, check_capacity, cpu_valued_warnings, smallest_fix

    cluster = Cluster.parse(args.cluster)
    cfg = load_config(args.config, args.overrides)
    if not cfg.algorithm.is_online:
        raise InvalidInput(f"rayrlhf plan sizes online jobs; algorithm.name={cfg.algorithm.name} is offline")
    for warning in cpu_valued_warnings(cfg, {"GPU": float(cluster.total_gpus)}):
        log.warning("%s", warning)
    shapes: dict = {}
    report = check_capacity(cfg, cluster, shapes)
    sys.stdout.write(report.table() + "\n")
    if report.fits:
        return EXIT_OK
    fix = smallest_fix(cfg, cluster, report, shapes)
    advice = (f"smallest change that fits: {fix.describe()}" if fix else
              "no single change (or pair) of micro-batch, ZeRO stage, ranks, checkpointing, tensor parallelism or "
              "server sharing fits: the cluster is too small for this job")
    raise InvalidInput("this job does not fit the cluster:\n  " + "\n  ".join(report.problems) + "\n" + advice)


def cmd_train(args: argparse.Namespace) -> int:
    """Run one job on the cluster named by --address / RAY_ADDRESS, or on an embedded local Ray."""
    from rayrlhf.launch.run import run_job

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    run_job(cfg, resume=args.resume, capacity_check=not args.skip_capacity_check)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """A run's final/ or one of its checkpoints as a Hugging Face model, a LoRA adapter merged when asked."""
    from rayrlhf.launch.export import export

    dest = export(args.output_dir, step=args.step, merge=args.merge, dest=args.out)
    sys.stdout.write(f"{dest}\n")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved policy on a data file the way training evaluates (rayrlhf/launch/eval_policy.py)."""
    from rayrlhf.launch.eval_policy import run_eval, table

    out, result = run_eval(args.policy, args.data, args.config, args.overrides, args.output)
    sys.stdout.write(table(result) + f"\nwritten to {out}\n")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a job to a Ray cluster through the Jobs API (rayrlhf/launch/submit.py)."""
    from rayrlhf.launch.submit import SubmitError, run_submit

    try:
        return run_submit(
            args.config, args.overrides, _dashboard(args), args.working_dir, args.no_working_dir, args.excludes,
            args.follow, args.submission_id, resume=args.resume, stop_grace_s=args.stop_grace_s,
        )
    except SubmitError as exc:
        sys.stderr.write(f"rayrlhf: {exc}\n")
        return EXIT_FAILURE


def _dashboard(args: argparse.Namespace) -> str | None:
    """`submit --dashboard`; `--address` is accepted as its old name only for a dashboard URL: everywhere else
    `--address` is the Ray cluster address (`rayrlhf train --address HEAD:6379`), which the Jobs API cannot use."""
    if args.address is None:
        return args.dashboard
    if not args.address.startswith(("http://", "https://")):
        raise InvalidInput(f"--address {args.address}: rayrlhf submit talks to the cluster's dashboard; give it as "
                           "--dashboard http://HEAD:8265 (--address is the Ray cluster address of rayrlhf train)")
    log.warning("rayrlhf submit --address is now --dashboard (--address means the Ray cluster address elsewhere)")
    return args.address


def cmd_demo(args: argparse.Namespace) -> int:
    """The InstructGPT pipeline (SFT -> reward model -> PPO) on a tiny local model (rayrlhf/launch/demo.py)."""
    from rayrlhf.launch.demo import DemoSettings, run_demo

    knobs = {k: v for k, v in vars(args).items() if k in DemoSettings.__dataclass_fields__ and v is not None}
    run_demo(args.output_dir, DemoSettings(**knobs))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """A run's curves and sample transcripts in one self-contained HTML page (rayrlhf/launch/report.py)."""
    from rayrlhf.launch.report import write_report

    sys.stdout.write(f"{write_report(args.output_dir, args.out)}\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrlhf", description="Distributed RLHF on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="validate a config and print it resolved")
    _add_config_args(validate)
    validate.set_defaults(func=cmd_validate)
    plan = sub.add_parser("plan", help="estimate each actor's memory on a cluster; exit 2 when it does not fit")
    _add_config_args(plan)
    plan.add_argument("--cluster", required=True, metavar="nodes=N,gpus_per_node=G,gpu_mem_gib=M[,host_mem_gib=H]",
                      help="the cluster to plan for, e.g. nodes=1,gpus_per_node=8,gpu_mem_gib=80")
    plan.set_defaults(func=cmd_plan)
    train = sub.add_parser("train", help="run a job (online RL, or SFT / RM / DPO by algorithm.name)")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    train.add_argument("--skip-capacity-check", action="store_true",
                       help="start a GPU job even when the planner estimates it does not fit the cluster")
    train.set_defaults(func=cmd_train)
    export = sub.add_parser("export", help="write a run's final/ or a checkpoint as a Hugging Face model")
    export.add_argument("output_dir", help="the run's output_dir (holds config.yaml, checkpoints/, final/)")
    export.add_argument("--step", type=int, help="export checkpoint step_N (default: final/, else the latest checkpoint)")
    export.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the base model")
    export.add_argument("--out", help="folder to write (default: OUTPUT_DIR/merged for final/, else OUTPUT_DIR/export/step_N)")
    export.set_defaults(func=cmd_export)
    ev = sub.add_parser("eval", help="evaluate a run's final/ or checkpoint, or a model folder, on a data file")
    ev.add_argument("policy", metavar="CHECKPOINT_OR_DIR",
                    help="a run's output_dir (its final/, else its latest checkpoint), a checkpoint folder, a run's final/ "
                    "or a Hugging Face model folder")
    ev.add_argument("--data", required=True, help="prompts to evaluate on (jsonl/parquet, the columns the reward takes)")
    ev.add_argument("--config", help="job config with the reward and decoding (default: the run's config.yaml)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set schedule.eval_samples=8 (repeatable)")
    ev.add_argument("--output", help="JSON file to write (default: OUTPUT_DIR/eval/<policy>-<data>.json)")
    ev.set_defaults(func=cmd_eval)
    demo = sub.add_parser("demo", help="the whole InstructGPT pipeline (SFT -> reward model -> PPO) on a tiny local model")
    demo.add_argument("--output-dir", default="outputs/demo", help="where the stages and summary.json go (default: %(default)s)")
    for knob in ("sft_steps", "rm_steps", "ppo_steps", "n_train", "n_eval", "eval_samples", "seed"):  # shorter runs for tests
        demo.add_argument(f"--{knob.replace('_', '-')}", dest=knob, type=int, default=None, help=argparse.SUPPRESS)
    demo.set_defaults(func=cmd_demo)
    report = sub.add_parser("report", help="draw a run's curves and sample transcripts into one self-contained HTML page")
    report.add_argument("output_dir", help="the run's output_dir (holds metrics.jsonl; may still be running)")
    report.add_argument("--out", help="the HTML file to write (default: OUTPUT_DIR/report.html)")
    report.set_defaults(func=cmd_report)
    submit = sub.add_parser("submit", help="submit a job to a Ray cluster through the Jobs API")
    _add_config_args(submit)
    submit.add_argument("--dashboard", help="the cluster's dashboard (Jobs API), e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)")
    submit.add_argument("--address", help=argparse.SUPPRESS)  # the old name of --dashboard: http(s) URLs only
    submit.add_argument("--follow", action="store_true", help="stream the job's logs; exit 0 if it succeeds, 1 otherwise")
    wd = submit.add_mutually_exclusive_group()
    wd.add_argument("--working-dir", help="directory uploaded as the job's working directory (default: the current one)")
    wd.add_argument("--no-working-dir", action="store_true", help="upload only the config; run the cluster's installed rayrlhf")
    submit.add_argument(
        "--exclude", dest="excludes", action="append", default=[], metavar="PATTERN",
        help="gitignore-style pattern left out of the upload, besides .venv/, outputs/, checkpoints/, ... (repeatable)",
    )
    submit.add_argument("--submission-id", help="job id to use (default: rayrlhf-<algorithm>-<time>-<random>)")
    submit.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
    submit.add_argument(
        "--stop-grace-s", type=int, default=600, metavar="S",
        help="how long `ray job stop` lets the job checkpoint and exit before killing it (default: %(default)s)",
    )
    submit.set_defaults(func=cmd_submit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InvalidInput as exc:
        sys.stderr.write(f"rayrlhf: {exc}\n")
        return EXIT_INVALID
    except Preempted as exc:
        sys.stderr.write(f"rayrlhf: {exc}\n")
        return EXIT_PREEMPTED
    except (WorkersLost, FailureBudgetExceeded) as exc:  # the message names the checkpoint; a traceback adds nothing
        sys.stderr.write(f"rayrlhf: {exc}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        sys.stderr.write("rayrlhf: interrupted\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
