"""Option groups of the ``kvmap`` commands, taken from the config dataclasses (defaults and help texts).

A CLI option that stands for a dataclass field gets its default and its help from that field (the
attribute docstring under it), so nothing is declared twice: change ``ImportConfig.top_k`` and the
``--top-k`` default and help follow. Import options default to ``None`` in argparse, so a command can
tell an option the user typed from one left alone (splice mode refuses import-only options).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap

from kvmap.errors import InputError


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: field name -> the string literal right under it (one line)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def field_default(cls: type, name: str):
    """The default of dataclass field ``name`` (``default_factory`` called)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _escape(text: str) -> str:
    return text.replace("``", "").replace("%", "%%")  # argparse formats help with %; no reST quotes


def add_field_option(parser, flag: str, cls: type, name: str, *, default=None, show_default=None,
                     extra: str = "", **kwargs) -> None:
    """``parser.add_argument(flag)`` documented by field ``name`` of dataclass ``cls``.

    ``default``: argparse's default (None: "not given"); ``show_default``: the default the help names
    (the field's own unless given).
    """
    shown = field_default(cls, name) if show_default is None else show_default
    help_text = f"{field_docs(cls).get(name, '')}{(' ' + extra) if extra else ''} (default {shown})"
    parser.add_argument(flag, default=default, help=_escape(help_text.strip()), **kwargs)


def comma_ints(text: str) -> list[int]:
    """``"16000,64k,1M"`` -> [16000, 64000, 1000000] (argparse type)."""
    try:
        return [int(x.replace("_", "").lower().replace("k", "000").replace("m", "000000")) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers (e.g. 16000,64k)")


def store_choices() -> list[str]:
    """Store kinds a new memory can use: the registry's names and their aliases."""
    from kvmap.stores import STORE_KINDS
    from kvmap.stores.base import ALIASES

    return [*STORE_KINDS, *(alias for alias, kind in ALIASES.items() if kind in STORE_KINDS)]


def at_least(flag: str, value: int | None, low: int) -> None:
    """InputError unless ``value`` (an int option, None when not given) is ``low`` or more."""
    if value is not None and value < low:
        raise InputError(f"{flag} must be {low} or more, got {value}")


# -- import options (ImportConfig and its retrieval modes) -------------------------------------------

TOKEN_FLAGS = {"top_k": "--top-k", "distance": "--distance", "placement": "--placement", "layers": "--layers"}
REUSE_FLAGS = {"reuse": "--reuse", "reuse_next": "--reuse-next", "reuse_next_best": "--reuse-next-best",
               "reuse_probe": "--reuse-probe"}
BLOCK_FLAGS = {"block_size": "--block-size", "n_blocks": "--n-blocks"}
"""Flat option name (:data:`kvmap.ports.OPTION_NAMES`) -> CLI flag."""


def add_import_options(parser, defaults: dict | None = None, reuse: bool = True) -> None:
    """``--top-k --distance --placement --layers`` (and ``--reuse*``) from ImportConfig and RetrievalReuse.

    ``defaults``: flat options of a preset whose values the help names (``kvmap bench scale``).
    """
    from kvmap.config import PLACEMENTS, ImportConfig, RetrievalReuse

    shown = {**ImportConfig().options(), **(defaults or {})}
    add_field_option(parser, "--top-k", ImportConfig, "top_k", type=int, show_default=shown["top_k"])
    add_field_option(parser, "--distance", ImportConfig, "distance", type=int, show_default=shown["distance"])
    add_field_option(parser, "--placement", ImportConfig, "placement", show_default=shown["placement"],
                     choices=[p for p in PLACEMENTS if p != "contiguous"])
    add_field_option(parser, "--layers", ImportConfig, "layers", show_default="all",
                     extra="Written e.g. 0-14, 0-28/2 or 3+7+20-29.")
    if not reuse:
        return
    off = "; 0: off, search at every token" if not shown["reuse"] else ""
    add_field_option(parser, "--reuse", RetrievalReuse, "candidates", type=int, show_default=f"{shown['reuse']}{off}",
                     extra="Search the memory once, for the prompt, and decode among those candidates: for "
                           "memories too large to search per token.")
    add_field_option(parser, "--reuse-next", RetrievalReuse, "next", type=int, show_default=shown["reuse_next"])
    add_field_option(parser, "--reuse-next-best", RetrievalReuse, "next_best", type=int,
                     show_default=shown["reuse_next_best"])
    add_field_option(parser, "--reuse-probe", RetrievalReuse, "probe", type=int,
                     show_default=shown.get("reuse_probe", 0), extra="`kvmap index` builds the index.")


def add_block_options(parser, defaults: dict) -> None:
    """``--block-size --n-blocks`` from BlockRetrieval, the defaults named from a preset's flat options."""
    from kvmap.config import BlockRetrieval

    add_field_option(parser, "--block-size", BlockRetrieval, "size", type=int, show_default=defaults["block_size"])
    add_field_option(parser, "--n-blocks", BlockRetrieval, "n_blocks", type=int, show_default=defaults["n_blocks"])


def given(args, flags: dict[str, str]) -> dict:
    """Flat options the user typed among ``flags`` (argparse leaves the others None)."""
    out = {}
    for name in flags:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    return out


def import_options(args, base: dict | None = None) -> dict:
    """Flat import options: ``base`` (a preset's) overridden by what the user typed; ``--layers`` parsed."""
    from kvmap.config import parse_layers

    typed = given(args, {**TOKEN_FLAGS, **REUSE_FLAGS, **BLOCK_FLAGS})
    options = {**(base or {}), **typed}
    if options.get("reuse") == 0:  # --reuse 0 turns a preset's reuse off, with its followers
        options = {k: v for k, v in options.items() if k in typed or not k.startswith("reuse_")}
    if isinstance(options.get("layers"), str):
        options["layers"] = parse_layers(options["layers"])
    return options


def import_config(args, base: dict | None = None):
    """The ImportConfig of ``base`` (a preset's flat options) plus the options typed; InputError if invalid."""
    from kvmap.config import ImportConfig

    try:
        return ImportConfig.from_options(**import_options(args, base))
    except InputError as err:  # "top_k must be 1 or more" -> "--top-k must be 1 or more"
        message = str(err)
        for name, flag in {**TOKEN_FLAGS, **REUSE_FLAGS, **BLOCK_FLAGS}.items():
            if message.startswith(f"{name} "):
                raise InputError(flag + message[len(name):]) from None
        raise
