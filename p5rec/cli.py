"""The `p5rec` command: one sub-command group per stage.

Each stage module exposes ``add_cli(subparsers)`` which adds its parser(s) and sets ``func`` on them.
Modules are imported lazily so that ``p5rec data`` and ``p5rec templates`` do not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# sub-command -> module that defines it (module.add_cli(subparsers))
COMMANDS = {
    "data": "p5rec.data.prepare",
    "templates": "p5rec.prompts.templates",
    "train": "p5rec.train.training",
    "evaluate": "p5rec.eval.evaluation",
    "predict": "p5rec.serve.inference",
    "serve": "p5rec.serve.app",
}
# sub-commands a module adds to another module's group: group -> modules (module.add_cli(the group's subparsers))
SUBCOMMANDS = {"templates": ("p5rec.serve.studio",)}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p5rec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    argv = sys.argv[1:] if argv is None else argv
    # Only import the module of the command being run (or all of them for --help).
    wanted = [a for a in argv if a in COMMANDS][:1] or list(COMMANDS)
    for name in wanted:
        group = importlib.import_module(COMMANDS[name]).add_cli(sub)
        for module in SUBCOMMANDS.get(name, ()):
            importlib.import_module(module).add_cli(group)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `p5rec templates list | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
