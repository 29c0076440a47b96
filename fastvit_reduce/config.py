"""Strict fastargs configuration: YAML files + ``--section.key=value`` overrides.

fastargs 1.2.0 is used for declaring parameters (``Section(...).params(...)`` beside the code
that reads them) and for ``@param`` injection, but its loading is too forgiving for sweeps:

* unknown YAML keys are silently ignored,
* ``Param(bool)`` turns the string ``"False"`` into ``True``,
* ``Config.validate()`` calls ``sys.exit()`` with status 0 on errors.

``load_config`` below parses the sources itself, rejects unknown keys (with a "did you mean"),
validates every value and raises ``ConfigError`` naming each bad key, before any work starts.
Precedence: later ``--config`` files override earlier ones; CLI overrides all files.
Environment variables are *not* read (fastargs would give them the highest precedence, which
makes runs hard to reproduce from their logged command).
"""
from __future__ import annotations

import difflib
import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Iterable, Sequence

import yaml
from fastargs import get_current_config
from fastargs.validation import Checker


class ConfigError(ValueError):
    """A configuration problem; the message names every offending key."""


class UsageError(ValueError):
    """A bad command line or input of a subcommand: printed as one ``error:`` line, exit code 2."""


# ----------------------------------------------------------------------------- checkers
class Bool01(Checker):
    """A flag written as 0 or 1 (why: fastargs' bool checker maps "False" to True)."""

    def check(self, value):
        if isinstance(value, bool):
            raise ValueError("write flags as 0 or 1, not true/false")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip() in ("0", "1"):
            return value.strip() == "1"
        raise ValueError(f"expected 0 or 1, got {value!r}")

    def help(self):
        return "0 or 1"


class Choice(Checker):
    """One of a fixed, ordered list of strings."""

    def __init__(self, *choices: str):
        self.choices = tuple(choices)

    def check(self, value):
        value = str(value)
        if value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
        return value

    def help(self):
        return "one of " + "|".join(self.choices)


class Number(Checker):
    """An int or float within [lo, hi] (either bound open with ``lo_open``/``hi_open``)."""

    def __init__(self, kind=float, lo=None, hi=None, lo_open=False, hi_open=False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open

    def check(self, value):
        if isinstance(value, bool):
            raise ValueError("expected a number")
        if self.kind is int:
            as_float = float(value)
            if not math.isfinite(as_float):
                raise ValueError(f"{as_float} is not a finite number")
            if not as_float.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            value = int(as_float)
        else:
            value = float(value)
        if not math.isfinite(value):  # why: nan passes every range check (nan < lo is False)
            raise ValueError(f"{value} is not a finite number")
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise ValueError(f"{value} out of range")
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            raise ValueError(f"{value} out of range")
        return value

    def help(self):
        name = "an integer" if self.kind is int else "a number"
        lo = "" if self.lo is None else ("> " if self.lo_open else ">= ") + str(self.lo)
        hi = "" if self.hi is None else ("< " if self.hi_open else "<= ") + str(self.hi)
        return " ".join(x for x in (name, lo, "and" if lo and hi else "", hi) if x)


class FloatList(Checker):
    """A list of floats, from YAML ``[0.9, 0.999]`` or a CLI string ``0.9,0.999``."""

    def __init__(self, length: int | None = None):
        self.length = length

    def check(self, value):
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
        out = [float(v) for v in value]
        if not all(map(math.isfinite, out)):
            raise ValueError(f"{out} holds a value that is not a finite number")
        if self.length is not None and len(out) != self.length:
            raise ValueError(f"expected {self.length} numbers, got {len(out)}")
        return out

    def help(self):
        return f"{self.length or 'N'} comma-separated numbers"


# ----------------------------------------------------------------------------- loading
def declared_keys(sections: Iterable[str] | None = None) -> dict[str, object]:
    """``{'section.key': Param}`` of every declared parameter (optionally only ``sections``)."""
    cfg = get_current_config()
    keys = {".".join(path): p for path, p in cfg.entries.items()}
    if sections is not None:
        allowed = set(sections)
        keys = {k: p for k, p in keys.items() if k.split(".")[0] in allowed}
    return keys


def file_problem(path: str | Path, label: str) -> str | None:
    """Why ``path`` cannot be read as a regular file, as one sentence about ``label`` ("dataset",
    "config file"): not found, a folder, a FIFO, a symbolic link loop or to nothing, a name the OS
    refuses; None when it is a regular file (readable or not: opening it says why not)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{label} {path} is a symbolic link loop"
        if e.errno == errno.ENOENT and os.path.lexists(path):
            return f"{label} {path} is a symbolic link to nothing"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"{label} not found: {path}"
        return f"cannot use {label} {path}: {e.strerror or e}"
    except ValueError as e:  # an embedded NUL byte
        return f"cannot use {label} {path!r}: {e}"
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    kind = next((word for test, word in kinds if test(mode)), "not a regular file")
    return f"{label} {path} is {kind}, not a file"


def read_text(path: str | Path, label: str) -> str:
    """A UTF-8 text file's contents; ``ConfigError`` in one line when it is not a readable regular
    file or not UTF-8 (naming the first bad byte)."""
    problem = file_problem(path, label)
    if problem:
        raise ConfigError(problem)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {label} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label} {path} is not UTF-8 text (byte {data[e.start]:#04x} at offset "
                          f"{e.start})") from None


class _Null:
    """A YAML null (``epochs:`` with nothing after it, ``~``, ``null``), kept so that ``_flatten``
    can refuse it by name: fastargs would treat it as "not given" and use the code's default."""

    def __init__(self, line: int):
        self.line = line

    def __repr__(self) -> str:
        return "null"


class _DuplicateKey(yaml.YAMLError):
    """A key written twice in one YAML mapping (message: 'line N: ...')."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (a repeated section too).

    why: PyYAML keeps the last value silently, so ``training:`` written twice drops the first
    block's keys without a word.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # resolve '<<' merge keys first: they may override
            first: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise _DuplicateKey(f"line {line}: key '{key}' repeated (first at line {first[key]})")
                    first[key] = line
                except TypeError:
                    pass  # an unhashable key: SafeLoader's own error names it
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:null", lambda loader, node: _Null(node.start_mark.line + 1))


def _flatten(tree: dict, prefix: str = "", source: str = "") -> dict[str, object]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, _Null):
            raise ConfigError(f"{source}: line {v.line}: '{key}' has no value (an empty YAML value is "
                              "null); write a value or delete the line")
        part = _flatten(v, key + ".", source) if isinstance(v, dict) else {key: v}
        for twice in part.keys() & flat.keys():  # 'training.epochs: 1' beside 'training: {epochs: 2}'
            raise ConfigError(f"{source}: key '{twice}' is given twice")
        flat.update(part)
    return flat


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, tuple[object, str]]:
    """Flattened ``{'section.key': (value, source)}`` of one YAML file.

    A top-level ``base: other.yaml`` (or a list of files), resolved relative to this file, is
    loaded first and overridden by this file's own keys, so ``rn_configs/thin.yaml`` can build on
    ``rn_configs/base.yaml`` and still be passed alone as ``--config rn_configs/thin.yaml``.
    """
    path = Path(path)
    text = read_text(path, "config file")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a cycle")
    try:
        tree = yaml.load(text, Loader=_StrictLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    given = tree.pop("base", None)
    bases = [given] if isinstance(given, str) else given or []
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: 'base' must be a file name or a list of file names, got {given!r}")
    merged: dict[str, tuple[object, str]] = {}
    for base in bases:
        merged.update(read_yaml(path.parent / base, _seen + (path.resolve(),)))
    merged.update({k: (v, str(path)) for k, v in _flatten(tree, source=str(path)).items()})
    return merged


def parse_argv(argv: Sequence[str]) -> tuple[list[str], dict[str, object]]:
    """Split argv into config files (``--config F`` / ``-C F``, repeatable) and overrides."""
    files, overrides, i = [], {}, 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-C", "--config-file"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a file name")
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config=") or arg.startswith("--config-file="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            overrides[key] = (value, "command line")
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides[arg[2:]] = (argv[i + 1], "command line")
            i += 1
        else:
            raise ConfigError(f"cannot parse argument {arg!r}: use --section.key=value or --config FILE")
        i += 1
    return files, overrides


def load_config(argv: Sequence[str], sections: Iterable[str] | None = None):
    """Load, check and install the global fastargs config from argv; return it.

    Raises ``ConfigError`` listing every unknown key (with suggestions) and every invalid value
    (with the allowed range), so a typo in a sweep config stops the run before any work.
    """
    return load(*parse_argv(argv), sections)


def load(files: Sequence[str], overrides: dict[str, tuple[object, str]], sections: Iterable[str] | None = None):
    """``load_config`` from config files (later ones win) and ``{'section.key': (value, source)}``
    overrides (which win over every file)."""
    merged: dict[str, tuple[object, str]] = {}
    for f in files:
        merged.update(read_yaml(f))
    merged.update(overrides)
    return install(merged, sections)


def install(values: dict[str, tuple[object, str]], sections: Iterable[str] | None = None):
    """Validate ``{'section.key': (value, source)}`` and make it the current fastargs config."""
    known = declared_keys(sections)
    problems = []
    for key, (_, source) in values.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            problems.append(f"unknown key '{key}' (from {source})"
                            + (f" — did you mean '{hint[0]}'?" if hint else ""))
    cfg = get_current_config()
    cfg.content = {}
    cfg.collect({k: v for k, (v, _) in values.items() if k in known})
    for key, param in known.items():
        path = tuple(key.split("."))
        raw = cfg.content.get(path, param.default)
        if raw is None and not param.required:
            continue
        try:
            param.checker.check(raw)
        except Exception as e:  # noqa: BLE001 — any checker failure is a config error
            source = values.get(key, (None, "default"))[1]
            detail = f" ({e})" if str(e) else ""
            problems.append(f"invalid value for '{key}' (from {source}): got {raw!r}, "
                            f"expected {param.checker.help()}{detail}")
    if problems:
        raise ConfigError("configuration error:\n  " + "\n  ".join(problems))
    return cfg


def resolved(sections: Iterable[str] | None = None) -> dict[str, object]:
    """The current config as a flat ``{'section.key': value}`` dict (defaults filled in)."""
    cfg = get_current_config()
    out = {}
    for key in sorted(declared_keys(sections)):
        value = cfg[key]
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def dump_json(obj, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
