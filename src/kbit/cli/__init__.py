"""``python -m kbit``: the command line. One module per subcommand; this one only builds the parser and dispatches.

    python -m kbit                       # same as `doctor`
    python -m kbit doctor                # versions, CPU kernel level, threads, self-check of every op
    python -m kbit demo                  # train a byte-level transformer: AdamW vs AdamW8bit vs Lion8bit, then QLoRA
    python -m kbit quantize IN OUT       # a safetensors checkpoint to NF4/FP4 in bitsandbytes' 4-bit format
    python -m kbit bench                 # the benchmarks in benchmarks/ and their ratio tables

Each subcommand takes --help. Subcommand modules import torch and kbit only when they run, so
``--help`` and argument errors are quick.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, demo, doctor, quantize

# (name, module): each module has ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS = [("doctor", doctor), ("demo", demo), ("quantize", quantize), ("bench", bench)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kbit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(n for n, _ in SUBCOMMANDS) + "}")
    for name, module in SUBCOMMANDS:
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run, validate=getattr(module, "validate", None), subparser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no subcommand: the doctor
        args = parser.parse_args(["doctor"])
    if args.validate is not None:
        problem = args.validate(args)
        if problem:
            args.subparser.error(problem)  # exits 2 with the subcommand's usage line
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
