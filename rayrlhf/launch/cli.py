"""The `rayrlhf` command line: one entry point, a sub-command per job kind.

Exit codes (DESIGN.md): 0 success; 2 invalid input, with a short message naming the field,
file or line; 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from rayrlhf.config import load_config, to_yaml
from rayrlhf.errors import InvalidInput

log = logging.getLogger("rayrlhf")

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job config (YAML)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set algorithm.kl_coef=0.05 (repeatable)",
    )


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a config and print it resolved, defaults filled in."""
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(to_yaml(cfg))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    """Run one job on the cluster named by --address / RAY_ADDRESS, or on an embedded local Ray."""
    from rayrlhf.launch.run import run_job

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(args.config, overrides)
    run_job(cfg, resume=args.resume)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrlhf", description="Distributed RLHF on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="validate a config and print it resolved")
    _add_config_args(validate)
    validate.set_defaults(func=cmd_validate)
    train = sub.add_parser("train", help="run a job (online RL, or SFT / RM / DPO by algorithm.name)")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoints/latest")
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    train.set_defaults(func=cmd_train)
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
    except KeyboardInterrupt:
        sys.stderr.write("rayrlhf: interrupted\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
