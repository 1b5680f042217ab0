"""The ``kvmap`` command line: remember, ask, forget, info, eval, bench, report, limb, bridge, demo.

- :mod:`kvmap.cli.options`: option groups taken from the config dataclasses (defaults, help texts);
- :mod:`kvmap.cli.checks`: what the memory commands check before a model loads;
- :mod:`kvmap.cli.memory_commands`: remember, ask, forget, info;
- :mod:`kvmap.cli.eval_commands`: eval, bench scale, report;
- :mod:`kvmap.cli.model_commands`: limb, bridge, demo.

Every error a user can cause ends in one line, ``kvmap: error: ...``, and exit code 1 (2 for argparse's
usage errors); ``KVMAP_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from kvmap.cli import eval_commands, memory_commands, model_commands
from kvmap.errors import KVMapError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmap", description="Memory-mapped key/value memory for transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    memory_commands.add_parsers(sub)
    eval_commands.add_parsers(sub)
    model_commands.add_parsers(sub)
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
