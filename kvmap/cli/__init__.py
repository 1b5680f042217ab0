"""The ``kvmap`` command line: remember, ask, forget, info, eval, bench, report, limb, bridge, demo.

- :mod:`kvmap.cli.options`: option groups taken from the config dataclasses (defaults, help texts);
- :mod:`kvmap.cli.checks`: what the memory commands check before a model loads;
- :mod:`kvmap.cli.memory_commands`: remember, ask, forget, info;
- :mod:`kvmap.cli.model_commands`: limb, bridge, demo;
- eval, bench scale and report come from :mod:`kvmap.eval.commands`, a plugin (:data:`COMMAND_PLUGINS`).

Every error a user can cause ends in one line, ``kvmap: error: ...``, and exit code 1 (2 for argparse's
usage errors); ``KVMAP_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

from kvmap.cli import memory_commands, model_commands
from kvmap.errors import KVMapError

__all__ = ["COMMAND_PLUGINS", "build_parser", "main"]

COMMAND_PLUGINS = "kvmap.commands"
"""Entry-point group of ``add_parsers(subparsers)`` functions that add commands. kvmap's own measurement
commands (eval, bench, report: :mod:`kvmap.eval.commands`) come in this way, declared in pyproject.toml,
so that nothing outside ``kvmap.eval`` imports it; another package can add its commands the same way."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmap", description="Memory-mapped key/value memory for transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    memory_commands.add_parsers(sub)
    model_commands.add_parsers(sub)
    for plugin in sorted(entry_points(group=COMMAND_PLUGINS), key=lambda ep: ep.name):
        plugin.load()(sub)
    return p


def _os_error_line(err: OSError) -> str:
    """``<strerror>: <filename>`` for an OSError that escaped a command."""
    what = err.strerror or str(err) or type(err).__name__
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return f"{what}: {' -> '.join(names)}" if names else what


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    debug = os.environ.get("KVMAP_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KVMapError as err:
        if debug:
            raise
        print(f"kvmap: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # last resort: a file system refusal nobody turned into a KVMapError
        if debug:
            raise
        print(f"kvmap: error: {_os_error_line(err)} (KVMAP_DEBUG=1 shows where)", file=sys.stderr)
        return 1
    except MemoryError:
        if debug:
            raise
        print("kvmap: error: out of memory; try a smaller input or setting (KVMAP_DEBUG=1 shows where)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmap: interrupted", file=sys.stderr)
        return 130
