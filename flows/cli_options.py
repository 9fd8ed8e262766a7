"""The `galen` command line as data: a table of commands whose options come from typed configs.

`ConfigOptions(SomeConfig, ("max_length", ...))` adds one argparse option per named dataclass field:

  * the flag from the field name (`max_length` -> `--max-length`), unless the field's metadata (or
    the spec's `flags`) names another one (`num_workers` -> `--workers`);
  * the type from the annotation: int, float, str; bool -> a `store_true` switch; `list[str]` ->
    `nargs="+"`; `X | None` may be left out. A field without a default is a required option;
  * `choices` from the metadata (or the spec's `choices`; a callable is called when the parser is
    built), the help text from the metadata "help" (or the spec's `helps`);
  * the default: the field's own, or None with `override=True`, so a flag left out leaves the
    config's real source (params.yaml) in charge; the help then says which setting it overrides.

`ConfigOptions.values(args)` reads the parsed options back by field name (in override mode only the
ones given). `opt(...)` declares such a field; `Command` is one row of the table, `arg(...)` an option
that is no config field (`--params`, positional paths), `add_commands` turns the table into parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


def opt(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[Any] | None = None,
        flag: str | None = None, exclusive: str | None = None,
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also a command-line option. `exclusive`: options sharing this name
    form a mutually exclusive group. No default (nor default_factory): a required option."""
    meta = {"help": help, "choices": choices, "flag": flag, "exclusive": exclusive}
    return field(default=default, default_factory=default_factory,
                 metadata={k: v for k, v in meta.items() if v is not None})


class Option(Protocol):
    def add_to(self, parser: argparse.ArgumentParser) -> None: ...


@dataclass(frozen=True)
class Arg:
    """An option that is not a config field: `parser.add_argument(*flags, **kwargs)` as written."""

    flags: tuple[str, ...]
    kwargs: Mapping[str, Any]

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.flags, **self.kwargs)


def arg(*flags: str, **kwargs: Any) -> Arg:
    return Arg(flags, kwargs)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type of one value, whether it is a list) of an annotation; `X | None` is X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else hint
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


@dataclass(frozen=True)
class ConfigOptions:
    """Options for fields of a dataclass (see the module docstring)."""

    config: type | str                      # the dataclass, or "module:Class", imported when the parser is built
    names: tuple[str, ...] | None = None    # these fields, in this order (None: every field)
    section: str | None = None              # params.yaml section, for "override <section>.<field>" help texts
    override: bool = False                  # defaults None: only flags given change the config
    flags: Mapping[str, str] = field(default_factory=dict)      # field -> flag, for configs without such metadata
    helps: Mapping[str, str] = field(default_factory=dict)      # field -> help
    choices: Mapping[str, Sequence[Any] | Callable[[], Sequence[Any]]] = field(default_factory=dict)
    required: tuple[str, ...] = ()          # fields that must be given although they have a default

    def config_class(self) -> type:
        if isinstance(self.config, str):
            module, _, name = self.config.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.config

    def fields(self) -> list[dataclasses.Field]:
        by_name = {f.name: f for f in dataclasses.fields(self.config_class())}
        unknown = [n for n in self.names or () if n not in by_name]
        if unknown:
            raise TypeError(f"{self.config_class().__name__} has no fields {unknown}; it has {sorted(by_name)}")
        return [by_name[n] for n in self.names] if self.names is not None else list(by_name.values())

    def flag(self, f: dataclasses.Field) -> str:
        return self.flags.get(f.name) or f.metadata.get("flag") or "--" + f.name.replace("_", "-")

    def dest(self, f: dataclasses.Field) -> str:
        return self.flag(f).lstrip("-").replace("-", "_")

    def help(self, f: dataclasses.Field) -> str | None:
        text = self.helps.get(f.name) or f.metadata.get("help")
        if not (self.override and self.section):
            return text
        what = f"override {self.section}.{f.name}"
        return f"{text} ({what})" if text else what

    def argument(self, f: dataclasses.Field, hint: Any) -> dict[str, Any]:
        """add_argument's keywords of one field."""
        kind, is_list = _unwrap(hint)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        kw: dict[str, Any] = {"help": self.help(f)}
        if kind is bool and not is_list:
            if f.default is not False and not self.override:
                raise TypeError(f"{f.name}: a switch (store_true) needs the default False")
            return {**kw, "action": "store_true"}
        if kind not in (int, float, str):
            raise TypeError(f"{f.name}: no command-line form for the annotation {hint!r}")
        if kind is not str:
            kw["type"] = kind
        if is_list:
            kw["nargs"] = "+"
        choices = self.choices.get(f.name, f.metadata.get("choices"))
        if choices is not None:
            kw["choices"] = list(choices() if callable(choices) else choices)
        if f.name in self.required or not (has_default or self.override):
            kw["required"] = True
        elif not self.override:
            kw["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        return kw

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        hints = typing.get_type_hints(self.config_class())
        groups: dict[str, Any] = {}
        for f in self.fields():
            group = f.metadata.get("exclusive")
            if group and group not in groups:
                groups[group] = parser.add_mutually_exclusive_group()
            (groups[group] if group else parser).add_argument(self.flag(f), **self.argument(f, hints[f.name]))

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The parsed options by field name; in override mode only the ones given (a switch left off
        is not given)."""
        out = {f.name: getattr(args, self.dest(f)) for f in self.fields()}
        return {k: v for k, v in out.items() if not self.override or (v is not None and v is not False)}


@dataclass(frozen=True)
class Command:
    """One row of the command table: a command and its function, or a group of sub-commands."""

    name: str
    help: str
    func: Callable[[argparse.Namespace], None] | None = None
    options: Sequence[Option] = ()
    commands: Sequence[Command] = ()        # sub-commands (then `func` is None)
    description: str | None = None
    metavar: str = "SUBCOMMAND"             # of the sub-commands in usage lines


class CommandParser(argparse.ArgumentParser):
    """A command's parser that adds its options when it first parses or prints help: building the
    whole `galen` parser then imports no command's config module (torch, timm) for the commands
    that do not run."""

    pending: Sequence[Option] = ()

    def add_pending(self) -> CommandParser:
        pending, self.pending = self.pending, ()
        for option in pending:
            option.add_to(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self.add_pending()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.add_pending()
        return super().format_help()

    def format_usage(self) -> str:
        self.add_pending()
        return super().format_usage()


def add_commands(sub: Any, commands: Sequence[Command]) -> None:
    """Parsers for `commands` under the sub-parsers action `sub` (made with
    `parser_class=CommandParser`); the function runs as `args.func`."""
    for c in commands:
        parser = sub.add_parser(c.name, help=c.help, description=c.description)
        if c.commands:
            add_commands(parser.add_subparsers(dest=f"{c.name.replace('-', '_')}_command", required=True,
                                               metavar=c.metavar, parser_class=CommandParser), c.commands)
            continue
        parser.pending = tuple(c.options)
        parser.set_defaults(func=c.func)
