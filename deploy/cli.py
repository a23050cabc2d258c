"""The `masklet` command. Each subcommand lives in a module exposing `register(subparsers)`;
adding one (broker, ingest, prompt, run, serve) is one more module name in COMMANDS.

`masklet models` is small enough to live here (this module registers it like any other).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Sequence

from masklet.deploy.signals import restore_ctrl_c

COMMANDS = [
    "masklet.deploy.segment",
    "masklet.deploy.cli",  # models
    "masklet.deploy.kafka_cli",  # broker, ingest, prompt
    "masklet.deploy.serve_cli",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masklet", description="Distributed SAM 2 video segmentation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    restore_ctrl_c()
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit with status 2 (argparse)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("masklet: interrupted", file=sys.stderr)
        return 130


# -- masklet models ------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="list the SAM 2 / 2.1 variants and download checkpoints")
    p.add_argument("--download", metavar="NAME", help="download NAME's official checkpoint into the cache")
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from masklet.model import available_models
    from masklet.model.checkpoints import CheckpointError, checkpoint_url, default_cache_dir, download_checkpoint

    names = list(available_models())
    if args.download:
        if args.download not in names:
            print(f"masklet models: error: unknown model {args.download!r}; choose one of {', '.join(names)}",
                  file=sys.stderr)
            return 2
        try:
            path = download_checkpoint(args.download)
        except CheckpointError as exc:
            print(f"masklet models: error: {exc}", file=sys.stderr)
            return 1
        print(f"{args.download}: {path}")
        return 0
    cache = default_cache_dir()
    width = max(len(n) for n in names)
    print(f"{'model'.ljust(width)}  cached  url")
    for name in names:
        cached = "yes" if (cache / f"{name}.pt").is_file() else "no"
        print(f"{name.ljust(width)}  {cached.ljust(6)}  {checkpoint_url(name)}")
    print(f"cache: {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
