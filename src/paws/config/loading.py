"""Reading, checking and writing configs: YAML files and ``--set section.key=value`` overrides
into :class:`paws.config.Config`.

An unknown or misspelt key, a value of the wrong type or out of range is a :class:`UserError`
that names the key (and suggests the closest valid one). ``configs/`` holds the paper's recipes.
The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from paws.config.schema import Config, optimizer_defaults
from paws.errors import UserError, first_line
from paws.files import read_text, write_atomic

__all__ = [
    "load_config",
    "read_yaml",
    "from_dict",
    "to_dict",
    "save_config",
    "apply_overrides",
    "describe",
    "recipe_path",
    "RECIPES_DIR",
    "DATA_PATHS",
    "absolute_data_paths",
    "relative_data_paths",
    "with_absolute_paths",
]

# The data keys that name files or folders: a run records them absolute, so that it reads the
# same data from whatever folder a later command runs in.
DATA_PATHS = ("root", "unlabeled", "labeled", "labels_file", "split_file", "test")

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 scalars: only true/false are booleans, so choices such as
    ``run.amp: off`` and ``data.in_memory: no`` stay strings, and ``1e-6`` is a float (PyYAML's
    YAML 1.1 rules read it as a string)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# A config is a few hundred values: anything far larger or deeper is a mistake or an attack
# (aliases of aliases, "billion laughs", expand to gigabytes from a few lines).
MAX_YAML_DEPTH = 50
MAX_YAML_VALUES = 100_000


class _Refused(yaml.YAMLError):
    """YAML that parses but is refused: a duplicate key, too deep, too large once expanded."""


def _compose_node(self: _Loader, parent: Any, index: Any) -> Any:
    """PyYAML's composer, counting depth so that deep nesting is refused before Python's
    recursion limit is reached (a RecursionError traceback otherwise)."""
    self.depth = getattr(self, "depth", 0) + 1
    try:
        if self.depth > MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise _Refused(f"nested more than {MAX_YAML_DEPTH} deep (line {mark.line + 1})")
        return yaml.SafeLoader.compose_node(self, parent, index)
    finally:
        self.depth -= 1


def _construct_mapping(self: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    """A mapping, refusing a key written twice: YAML would keep the last one silently."""
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = self.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in first:
            raise _Refused(
                f"the key '{key}' is written twice (lines {first[key]} and {line}); keep one"
            )
        first[key] = line
    return yaml.SafeLoader.construct_mapping(self, node, deep)


_Loader.compose_node = _compose_node  # type: ignore[method-assign]
_Loader.construct_mapping = _construct_mapping  # type: ignore[method-assign]


def _expanded_size(node: yaml.Node) -> int:
    """How many values ``node`` holds with every alias expanded, counted without expanding
    (each shared node once), stopping past :data:`MAX_YAML_VALUES`.

    Raises:
        _Refused: more values than that, or an alias inside itself (a recursive value).
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_:
            raise _Refused(
                f"an alias refers to a value that holds it (line {n.start_mark.line + 1})"
            )
        open_.add(id(n))
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        else:
            children = []
        for c in children:
            total += size(c)
            if total > MAX_YAML_VALUES:
                raise _Refused(
                    f"its aliases expand to more than {MAX_YAML_VALUES:,} values; write the "
                    "values out"
                )
        open_.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def _yaml_load(text: str) -> Any:
    """YAML text as plain data (a SafeLoader), refusing duplicate keys, nesting deeper than
    :data:`MAX_YAML_DEPTH` and aliases that expand past :data:`MAX_YAML_VALUES` values."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# Switches also take the YAML 1.1 words (which the loader above keeps as strings).
_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert: int to float, tuple to list) ``value`` against ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = UserError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        words: list[str] = []  # a misspelt choice gets the nearest one suggested
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError:
                if typing.get_origin(a) is Literal:
                    words += [str(w) for w in typing.get_args(a)]
        close = difflib.get_close_matches(str(value), words, n=1) if isinstance(value, str) else []
        if close:
            raise UserError(f"{bad} (did you mean '{close[0]}'?)")
        raise bad
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(x, args[0], f"{key}[{i}]") for i, x in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        return {k: _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is Any:  # checked by the section's own validate()
        return list(value) if isinstance(value, tuple) else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:
            return _YAML11_BOOLS[value.lower()]
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _check_range(value: Any, rng: tuple | None, key: str) -> None:
    if rng is None or value is None or isinstance(value, (list, str, bool)):
        return
    lo, hi = rng
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        shown = f"{value:.3g}" if abs(value) > 1e12 else value  # e.g. 1e30 read as an int
        raise UserError(f"{key} must be {span}, got {shown}")


def _unknown(key: str, valid: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return UserError(f"unknown config key '{where}{key.split('.')[-1]}'{hint}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(
            f"config section '{where.rstrip('.') or 'top level'}' must be a mapping of keys, "
            f"got {str(values)[:60]!r}"
        )
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(str(key), list(fields), where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            # An empty section (``optim:``) is the defaults; ``optim: false`` is a mistake.
            kwargs[key] = _build(tp, {} if value is None else value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
            _check_range(kwargs[key], fields[key].metadata.get("range"), f"{where}{key}")
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict (missing keys take defaults)."""
    return _build(Config, optimizer_defaults(values or {}), "").validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a nested dict of plain YAML types."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, extra: dict, where: str = "") -> dict:
    """``base`` with the nested values of ``extra`` set into it.

    Raises:
        UserError: a key set below a value that is not a section (``--set optim.steps=4`` on a
            config whose ``optim`` is ``false``): the value would be silently replaced.
    """
    out = dict(base)
    for k, v in extra.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            out[k] = _merge(old, v, f"{where}{k}.")
        elif isinstance(v, dict) and old is not None:
            raise UserError(
                f"--set {where}{k}.{next(iter(v), '')}: the config's '{where}{k}' is "
                f"{str(old)[:40]!r}, not a section of keys; fix the config"
            )
        else:
            out[k] = v
    return out


def recipe_path(name_or_path: str) -> Path:
    """Resolve a config argument: a YAML path, or the name of a packaged recipe."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise UserError(f"config file not found: {name_or_path} (packaged recipes: {', '.join(names)})")


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML config file's mapping of sections, unchecked (:func:`from_dict` checks it).

    Raises:
        UserError: a file that cannot be read, is not UTF-8 text, does not parse, or is not a
            mapping.
    """
    try:
        data = _yaml_load(read_text(path, "config", "save it as UTF-8 YAML"))
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {first_line(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config sections")
    return data


def absolute_data_paths(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (a nested config dict) with its :data:`DATA_PATHS` made absolute against the
    working directory (``~`` expanded): a path a user gives means the folder they are in, and
    the run records where that was."""
    data = values.get("data") if isinstance(values, dict) else None
    if not isinstance(data, dict):
        return values
    fixed = {
        k: os.path.abspath(os.path.expanduser(v)) if k in DATA_PATHS and isinstance(v, str) else v
        for k, v in data.items()
    }
    return {**values, "data": fixed}


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its data paths absolute (:func:`absolute_data_paths`): what a run saves."""
    data = absolute_data_paths({"data": dataclasses.asdict(cfg.data)})["data"]
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


def relative_data_paths(values: dict[str, Any]) -> list[str]:
    """The ``data.key=value`` settings of ``values`` (a nested config dict) whose paths are
    relative: in a saved run, relative to a folder it did not record."""
    data = values.get("data") if isinstance(values, dict) else None
    if not isinstance(data, dict):
        return []
    return [
        f"data.{k}={v}"
        for k, v in data.items()
        if k in DATA_PATHS and isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v))
    ]


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict; the data
    paths among them are made absolute (:func:`absolute_data_paths`)."""
    out = dict(values)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except _Refused as e:
            raise UserError(f"--set {key.strip()}: {first_line(e)}") from e
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        out = _merge(out, absolute_data_paths(nested))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (file or recipe name; None: defaults) and apply ``--set`` overrides.

    Args:
        path: YAML file or packaged recipe name; None for the Fashion-MNIST defaults.
        overrides: ``section.key=value`` strings.

    Returns:
        A validated :class:`Config`, its data paths absolute (relative ones are taken from the
        working directory).
    """
    values: dict[str, Any] = read_yaml(recipe_path(str(path))) if path else {}
    return from_dict(apply_overrides(absolute_data_paths(values), list(overrides or [])))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically: a full disk leaves the old file (or
    none), never an empty or half-written one."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe() -> str:
    """Every config key with its type, default and doc, for ``paws config --help``."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = _hints(Config)[section.name]
        lines.append(f"{section.name}:")
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(
                f"  {f.name} ({_type_name(hints[f.name])}, default {default!r}): "
                f"{f.metadata.get('doc', '')}"
            )
    return "\n".join(lines)
