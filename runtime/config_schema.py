"""What a config dataclass declares: each leaf key's type, default and meaning, for `show --keys` and
docs/config.md (scripts/config_docs.py)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from runtime.config import yaml_text


def field_help(cls: type) -> dict[str, str]:
    """Each field's meaning: `metadata={"help": ...}` if given, else the comment at the end of its line (in the
    class that defines it: a stage's section extends the core's, e.g. pretrain's model section)."""
    import inspect
    import io
    import textwrap
    import tokenize

    names = {f.name for f in dataclasses.fields(cls)}
    helps = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's comment wins
        source = textwrap.dedent(inspect.getsource(klass))
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            name = tok.line.split(":", 1)[0].strip()
            if tok.type == tokenize.COMMENT and name in names:
                helps[name] = tok.string.lstrip("#").strip()
    helps.update({f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata})
    return helps


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a!r}`" if a == "" else f"`{a}`" for a in args)  # '' = unset
    if origin in (list, tuple):
        return f"[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def config_fields(cls: type, path: str = "") -> list[dict]:
    """Every leaf key of a config dataclass: {"key": "a.b", "type", "default" (as YAML), "help"}, in order."""
    hints, helps, rows = typing.get_type_hints(cls), field_help(cls), []
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += config_fields(hints[f.name], key)
            continue
        value = json.loads(json.dumps(getattr(defaults, f.name)))  # tuples -> lists
        rows.append({"key": key, "type": _type_name(hints[f.name]), "help": helps.get(f.name, ""),
                     "default": yaml_text(value)})
    return rows
