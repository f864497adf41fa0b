"""Entry-point plumbing shared by the command-line tools: settings declared once, the parsers
generated from them, plugins named on the command line, and :func:`run_cli`.

A setting is a field of a frozen settings dataclass declared with :func:`setting` (its default,
its flag's help and ``--help`` group, the check of its value) or, made of several flags, with
:func:`composite`; nested settings contribute their flags in place.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from utils.base.errors import StopNow, UserError

FLAG = "flag"
T = TypeVar("T")


@dataclass(frozen=True)
class Flag:
    """How a setting shows on the command line, and which values it accepts."""

    help: str | Callable[[], str] = ""
    # The --help section listing it (None: the parser's own options).
    group: str | None = None
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
    # A value ``check`` rejects is refused in one line: "--NAME VALUE: expected EXPECTED".
    check: Callable[[Any], bool] | None = None
    expected: str = ""
    metavar: str | None = None
    # How a tuple-valued flag takes its values: argparse's nargs, or "append" (one per use).
    nargs: str = "*"
    # Listed right after this flag of its group (a group may mix settings classes).
    after: str | None = None
    # A setting made of several flags: those flags, the setting of their values, and back.
    parts: Callable[[], list[Option]] | None = None
    join: Callable[[Mapping[str, Any]], Any] | None = None
    split: Callable[[Any], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Option:
    """One flag as a parser takes it: its name, default and value type, and its declaration."""

    name: str
    default: Any
    kind: Any
    flag: Flag


def setting(
    default: Any, help: str | Callable[[], str] = "", group: str | None = None, **flag: Any
) -> Any:
    """A settings field declared once: its default (MISSING: required), its flag, its check."""
    return field(default=default, metadata={FLAG: Flag(help, group, **flag)})


def composite(
    default: Any,
    parts: Callable[[], list[Option]],
    join: Callable[[Mapping[str, Any]], Any],
    split: Callable[[Any], dict[str, Any]],
) -> Any:
    """A settings field made of the flags ``parts()``: ``join`` makes it, ``split`` parts it."""
    return field(default=default, metadata={FLAG: Flag(parts=parts, join=join, split=split)})


def _plain(kind: Any) -> Any:
    """``kind`` without its None: ``int | None`` is int."""
    if get_origin(kind) in (Union, types.UnionType):
        kinds = [k for k in get_args(kind) if k is not type(None)]
        return kinds[0] if len(kinds) == 1 else kind
    return kind


def _default(item: Field[Any]) -> Any:
    """A field's default (MISSING: none, its flag is required)."""
    factory = item.default_factory
    return item.default if factory is MISSING else factory()  # type: ignore[misc]


def options(cls: type) -> list[Option]:
    """The flags of settings class ``cls`` in declaration order, nested settings' in place."""
    found: list[Option] = []
    hints = get_type_hints(cls)
    for item in fields(cls):
        flag = item.metadata.get(FLAG)
        if flag is not None and flag.parts is not None:
            found += flag.parts()
        elif flag is not None:
            found.append(Option(item.name, _default(item), hints[item.name], flag))
        elif is_dataclass(nested := _plain(hints[item.name])):
            found += options(nested)  # type: ignore[arg-type]
    return found


def ordered(found: Sequence[Option], groups: Sequence[str | None]) -> list[Option]:
    """The flags of ``groups``, group by group in declaration order (``after`` moves a flag)."""
    listed: list[Option] = []
    for group in groups:
        members = [option for option in found if option.flag.group == group]
        listed += [option for option in members if option.flag.after is None]
        for option in members:
            if option.flag.after is not None:
                names = [o.name for o in listed]
                listed.insert(names.index(option.flag.after) + 1, option)
    return listed


def add_flags(
    parser: argparse.ArgumentParser,
    found: Sequence[Option],
    groups: Sequence[str | None],
    **context: str,
) -> None:
    """Add the flags of ``groups`` to ``parser``, in that order (None: its own options);
    ``context`` fills the ``{name}`` fields of the help texts."""
    sections: dict[str | None, Any] = {None: parser}
    for option in ordered(found, groups):
        group = option.flag.group
        if group not in sections:
            sections[group] = parser.add_argument_group(group)
        sections[group].add_argument(f"--{option.name}", **_keywords(option, context))


def _keywords(option: Option, context: Mapping[str, str]) -> dict[str, Any]:
    """argparse's keywords for ``option``: its action or type, default, choices, help."""
    flag, kind = option.flag, _plain(option.kind)
    text = flag.help() if callable(flag.help) else flag.help
    words: dict[str, Any] = {"help": text.format(**context) if context else text}
    if option.default is MISSING:
        words["required"] = True
    else:
        words["default"] = option.default
    if kind is bool:
        action = "store_true" if option.default is False else argparse.BooleanOptionalAction
        return words | {"action": action}
    if get_origin(kind) is tuple:
        kind, words["default"] = get_args(kind)[0], list(option.default)
        words |= {"action": "append"} if flag.nargs == "append" else {"nargs": flag.nargs}
    if kind is not str:
        words["type"] = kind
    choices = flag.choices() if callable(flag.choices) else flag.choices
    if choices is not None:
        words["choices"] = choices
    if flag.metavar is not None:
        words["metavar"] = flag.metavar
    return words


def build(cls: type[T], values: Mapping[str, Any], **given: Any) -> T:
    """Settings ``cls`` of parsed flag ``values`` (nested settings built alike; ``given`` as is;
    lists become tuples; settings whose flags are absent keep their defaults)."""
    hints = get_type_hints(cls)
    kwargs = dict(given)
    for item in fields(cls):
        flag, kind = item.metadata.get(FLAG), hints[item.name]
        if item.name in given:
            continue
        if flag is not None and flag.join is not None:
            assert flag.parts is not None
            for part in flag.parts():
                check_value(part.name, values.get(part.name), part.flag)
            kwargs[item.name] = flag.join(values)
        elif flag is not None and item.name in values:
            value = values[item.name]
            kwargs[item.name] = tuple(value) if isinstance(value, list) else value
        elif flag is None and is_dataclass(kind):
            kwargs[item.name] = build(kind, values)  # type: ignore[arg-type]
    return cls(**kwargs)


def check_value(name: str, value: Any, flag: Flag) -> None:
    """Refuse ``value`` of ``--name`` in one line unless its check accepts it (or it is None)."""
    if value is not None and flag.check is not None and not flag.check(value):
        shown = list(value) if isinstance(value, tuple) else value
        raise UserError(f"--{name} {shown}: expected {flag.expected}")


def check_fields(settings: Any) -> None:
    """Check every declared field of ``settings`` (see :func:`check_value`), in order."""
    for item in fields(settings):
        flag = item.metadata.get(FLAG)
        if flag is not None and flag.join is None:
            check_value(item.name, getattr(settings, item.name), flag)


def flag_values(settings: Any) -> dict[str, Any]:
    """``settings``' values by flag name, nested settings' too (lists where flags give lists)."""
    values: dict[str, Any] = {}
    for item in fields(settings):
        value, flag = getattr(settings, item.name), item.metadata.get(FLAG)
        if flag is not None and flag.split is not None:
            values |= flag.split(value)
        elif flag is not None:
            values[item.name] = list(value) if isinstance(value, tuple) else value
        elif is_dataclass(value) and not isinstance(value, type):
            values |= flag_values(value)
    return values


def default_of(cls: type, name: str) -> Any:
    """The declared default of setting ``name`` of settings class ``cls``."""
    return next(_default(item) for item in fields(cls) if item.name == name)


# ----- plugins ------------------------------------------------------------------------------
# A user's module that registers data sets or losses is named with --plugin MODULE, as pytest
# names its plugins with -p: unlike an environment variable, a flag shows in the command that ran,
# is recorded in the run's args (so a resume and test.py import it again) and in printed hints.
PLUGIN = Flag(
    "import this module first: a user's data sets or losses (repeatable; recorded in the run, "
    "so --resume and test.py import it again)",
    metavar="MODULE",
    nargs="append",
)


def plugin_setting() -> Any:
    """The ``--plugin MODULE`` setting of the commands that read data sets or losses."""
    return field(default=(), metadata={FLAG: PLUGIN})


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--plugin MODULE`` to a tool's parser."""
    add_flags(parser, [Option("plugin", (), tuple[str, ...], PLUGIN)], [None])


def load_plugins(names: Iterable[str], source: str = "") -> None:
    """Import each plugin module (which registers its data sets or losses); ``source`` says
    where the names come from when the command line did not give them."""
    where = f" (recorded in {source})" if source else ""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - whatever fails, the plugin is named in one line
            first = str(err).splitlines()[0] if str(err) else ""
            raise UserError(
                f"--plugin {name}{where}: cannot be imported ({type(err).__name__}: {first})"
            ) from None


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a UserError becomes one ``error: ...`` line and exit status 2."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201 - the one line a user sees
        return 2
    except KeyboardInterrupt as err:
        # Ctrl-C is SIGINT: 130; a StopNow carries the signal that ended the run.
        signum = err.signum if isinstance(err, StopNow) else signal.SIGINT
        name = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        print(f"error: interrupted{name}", file=sys.stderr)  # noqa: T201
        return 128 + signum
