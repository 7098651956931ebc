"""Configs as data: a YAML recipe -> nested dataclasses, with `a.b=value` overrides.

Each stage defines its config as dataclasses (fields with defaults); `load_config` reads a recipe
(a name in the stage's recipes folder, or a path) and the chain of recipes it extends (`base:`), deep-merged,
applies command-line overrides, resolves `${a.b}` references, type-checks every value and refuses unknown
keys with the closest known names.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from runtime.io import atomic_write

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what and how to fix it.

    The message is kept to one line (a list of problems is joined with '; '): the CLIs print it as the
    single line of their error, which logs and schedulers show whole.
    """

    def __init__(self, message: object = ""):
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        self.lines = lines  # the message as given (a heading, then one problem per line)
        super().__init__(" ".join(lines[:1] + ["; ".join(lines[1:])]).strip() if lines else "")


class _Loader(yaml.SafeLoader):
    """safe_load's loader, refusing a key given twice in one mapping (YAML would keep the last one silently)."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys merged in may be overridden here
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, collections.abc.Hashable):
            continue  # construct_mapping names it
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (lines {seen[key]} and {key_node.start_mark.line + 1})", None)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)` with duplicate keys refused; a YAML error (a syntax error, a key given twice, or a
    `!!python/...` tag, which safe_load never constructs) becomes a one-line ConfigError naming `where`."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        why = " ".join(str(e).split())
        hint = "; python tags are refused: write plain values" if "!!python" in why or "python/" in why else ""
        raise ConfigError(f"{where} is not valid plain YAML ({why[:300]}){hint}") from None


def _unknown_key(path: str, key: str, known: list[str]) -> ConfigError:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(f'{path}.{c}' if path else c) for c in close)}? " if close else ""
    return ConfigError(f"unknown config key {full!r}: {hint}(valid keys here: {', '.join(known)})")


def check_value(tp: Any, value: Any, path: str) -> Any:
    """Return `value` as type `tp` or raise ConfigError naming the key, the type and the value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return check_value(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} is a section (a mapping of keys), got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            hint = f"; write it as [{value}]" if isinstance(value, str) and "," in value else ""
            raise ConfigError(f"{path} must be a list, got {value!r}{hint}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path} must have {len(args)} items, got {value!r}")
            return tuple(check_value(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        out = [check_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)  # an int, or a str: YAML 1.1 reads 1e-3 as a string
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):  # .nan slips past every `< 0` check
            raise ConfigError(f"{path} must be a finite number, got {value!r}")
        if number is not None:
            return number
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{path} must be {name}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, type-checking every value; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in fields:
            raise _unknown_key(path, key, list(fields))
        kwargs[key] = check_value(hints[key], value, f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field with no default
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> dict:
    """A config dataclass as plain data (tuples become lists), ready for YAML or JSON."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as YAML (`1e-3`, `true`, `[1, 2]`, `null`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    value = _yaml(raw, f"override {key.strip()!r}") if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(cls: type, data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each `a.b=value` applied; keys are checked against `cls`."""
    data = json.loads(json.dumps(data or {}))
    for text in overrides:
        keys, value = parse_override(text)
        node, tp, path = data, cls, ""
        for i, key in enumerate(keys):
            names = [f.name for f in dataclasses.fields(tp)]
            if key not in names:
                raise _unknown_key(path, key, names)
            path = f"{path}.{key}" if path else key
            sub = typing.get_type_hints(tp)[key]
            if i == len(keys) - 1:
                node[key] = value
            elif dataclasses.is_dataclass(sub):
                node = node.setdefault(key, {})
                tp = sub
            else:
                raise ConfigError(f"{path} is a value, not a section; cannot set {text!r}")
    return data


def find_recipe(recipe: str | os.PathLike, recipes_dir: str | os.PathLike) -> Path:
    """A recipe path, or a name in `recipes_dir` (with or without `.yaml`)."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = Path(recipes_dir) / f"{p.stem if p.suffix else p.name}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(q.stem for q in Path(recipes_dir).glob("*.yaml"))
    close = difflib.get_close_matches(str(recipe), names, n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"no recipe {str(recipe)!r}: {hint}(recipes: {', '.join(names)}; or give a YAML path)")


BASE_KEY = "base"  # a recipe's `base: other_recipe`: the recipe it extends (not a config key)


def _read_recipe(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; give a recipe name or the path of a YAML file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte order mark is not part of the recipe
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it "
                          "as UTF-8") from None
    data = _yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _check_keys(cls: type, data: dict, path: str = "") -> None:
    """Refuse a key that `cls` does not have (the types are checked once, after merging and interpolation)."""
    hints, names = typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(path, str(key), names)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_keys(hints[key], value, f"{path}.{key}" if path else key)


def _base_path(base: object, path: Path, recipes_dir: str | os.PathLike | None) -> Path:
    """`base:` of recipe `path`: a path (relative to that recipe's folder) or a name in `recipes_dir`."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be a recipe name or a YAML path, got {base!r}")
    if base.endswith((".yaml", ".yml")) or "/" in base:
        p = Path(base).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise ConfigError(f"{path}: base {base!r} is not a file ({p}); give a path relative to this recipe "
                              "or a recipe name")
        return p
    try:
        return find_recipe(base, recipes_dir or path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: base: {e}") from None


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, any other value (a list too) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_recipe(cls: type, path: str | os.PathLike, recipes_dir: str | os.PathLike | None = None,
                chain: tuple[Path, ...] = ()) -> dict:
    """A recipe file as data: its `base:` loaded first (recursively), this file's sections deep-merged over it.

    Each file's keys are checked against `cls` (an unknown key names the file it is in); a chain of bases
    that comes back to a file is refused, naming the chain."""
    path = Path(path)
    if path.resolve() in chain:
        names = " -> ".join(p.name for p in (*chain, path.resolve()))
        raise ConfigError(f"recipe base cycle: {names}; remove the `base:` that closes the loop")
    data = _read_recipe(path)
    base = data.pop(BASE_KEY, None)
    try:
        _check_keys(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if base is None:
        return data
    return deep_merge(load_recipe(cls, _base_path(base, path, recipes_dir), recipes_dir, (*chain, path.resolve())),
                      data)


_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")  # `$${` (a literal `${`) or a reference `${a.b}`


def _lookup(data: dict, ref: str, where: str) -> Any:
    node, path = data, ""
    for part in ref.strip().split("."):
        if not isinstance(node, dict):
            raise ConfigError(f"${{{ref}}} in {where}: {path} is a value, not a section")
        if part not in node:
            raise ConfigError(f"${{{ref}}} in {where}: {_unknown_key(path, part, list(node))} (write $${{ for a "
                              "literal ${)")
        node, path = node[part], f"{path}.{part}" if path else part
    return node


def interpolate(data: dict, defaults: dict | None = None) -> dict:
    """Resolve `${a.b}` in the string values of `data` (with `defaults` under it: a reference may name a key
    the recipe leaves at its default). A string that is one whole reference takes the referenced value, type
    included; references inside a longer string are formatted into it (non-strings as JSON); `$${` is a
    literal `${`. A missing key or a cycle is a one-line ConfigError."""
    full, done = deep_merge(defaults or {}, data), {}

    def resolve(value: Any, key: str, stack: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, f"{key}.{k}" if key else str(k), stack) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{key}[{i}]", stack) for i, v in enumerate(value)]
        if not isinstance(value, str) or "$" not in value:
            return value
        if key in done:
            return done[key]
        if key in stack:
            raise ConfigError(f"interpolation cycle: {' -> '.join((*stack[stack.index(key):], key))}; one of these "
                              "keys must hold a value")
        stack = (*stack, key)

        def ref(name: str) -> Any:
            return resolve(_lookup(full, name, key), name.strip(), stack)

        whole = _REF.fullmatch(value)
        if whole and whole.group(1) is not None:
            done[key] = ref(whole.group(1))
        else:  # embedded: a string as it is, any other value as JSON
            done[key] = _REF.sub(lambda m: "${" if m.group(1) is None else _embed(ref(m.group(1))), value)
        return done[key]

    return resolve(full, "", ())


def _embed(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _defaults(cls: type) -> dict:
    try:
        return to_dict(cls())
    except TypeError:  # a required field without a default: references may only name the recipe's keys
        return {}


def load_config(cls: type[T], recipe: str | os.PathLike | None, overrides: list[str] = (),
                recipes_dir: str | os.PathLike | None = None) -> T:
    """Read a recipe (name or path; None = defaults only) and its bases, apply overrides, resolve `${...}`,
    return a checked `cls`."""
    data: dict = {}
    if recipe is not None:
        data = load_recipe(cls, find_recipe(recipe, recipes_dir) if recipes_dir else Path(recipe), recipes_dir)
    return from_dict(cls, interpolate(apply_overrides(cls, data, list(overrides)), _defaults(cls)))


def _escape(value: Any) -> Any:
    """Strings with `${` written as `$${`, so that the YAML loads back as the same values."""
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value.replace("${", "$${") if isinstance(value, str) else value


def resolved_yaml(obj: Any) -> str:
    """A resolved config as recipe YAML: loading it gives `obj` again (no base, nothing left to interpolate)."""
    return yaml.safe_dump(_escape(to_dict(obj)), sort_keys=False)


def yaml_text(value: Any) -> str:
    """One value as short YAML (flow style, one line): how the CLIs and docs show a config value."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def flatten(data: dict, path: str = "") -> dict[str, Any]:
    """Nested config data -> {"a.b": leaf value}."""
    out = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        out.update(flatten(value, full) if isinstance(value, dict) and value else {full: value})
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every leaf that differs; a key one side lacks has the value None."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k) or (k in a) != (k in b)]


def save_config(obj: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    return atomic_write(path, resolved_yaml(obj))


def config_hash(obj: Any) -> str:
    """A short stable hash of a config (a dataclass or its `to_dict`), stored in checkpoints with the config."""
    data = obj if isinstance(obj, dict) else to_dict(obj)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
