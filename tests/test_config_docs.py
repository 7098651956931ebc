"""docs/configuration.md is generated from the config dataclasses: it must equal the generator's output, list
every key with its default, and give every key a meaning (a new field without a comment fails here)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from tests.conftest import ROOT


def _render() -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import config_docs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return config_docs.render()


def test_committed_page_equals_the_generator_output() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == _render(), "docs/configuration.md is stale: run `python scripts/config_docs.py`"
    proc = subprocess.run([sys.executable, "scripts/config_docs.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_key_has_its_default_and_a_meaning() -> None:
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig
    from runtime.config_schema import config_fields

    page = _render()
    for cls in (PretrainConfig, FinetuneConfig):
        rows = config_fields(cls)
        assert [r for r in rows if not r["help"]] == []  # every field carries a comment (or metadata help)
        for r in rows:
            assert f"| `{r['key']}` | {r['type']} | `{r['default']}` | {r['help']} |" in page
    keys = {r["key"]: r for r in config_fields(PretrainConfig)}
    assert keys["optim.lr"]["default"] == "0.001" and keys["optim.lr"]["help"].startswith("peak learning rate")
    assert keys["data.scale"]["default"] == "[0.08, 1.0]" and keys["zero.stage"]["type"] == "int or one of `auto`"
    assert keys["zero.stage"]["default"] == "auto" and keys["model.variant"]["help"]  # inherited: the core's comment
    assert "- precision is required (set it in the recipe or as precision=...)" in page  # required keys: validate()


@dataclasses.dataclass
class Inner:
    rate: float = 0.5  # how often: a # inside the comment is kept
    mode: str = dataclasses.field(default="a", metadata={"help": "from metadata"})  # the metadata wins


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    size: tuple[int, int] | None = None


@dataclasses.dataclass
class Derived(Inner):
    extra: int = 1  # added by a subclass


def test_a_field_comment_and_metadata_help_are_read() -> None:
    from runtime.config_schema import config_fields

    derived = {r["key"]: r["help"] for r in config_fields(Derived)}
    assert derived == {"rate": "how often: a # inside the comment is kept", "mode": "from metadata",
                       "extra": "added by a subclass"}  # inherited fields keep their comments
    rows = {r["key"]: r for r in config_fields(Outer)}
    assert rows["inner.rate"] == {"key": "inner.rate", "type": "float", "default": "0.5",
                                  "help": "how often: a # inside the comment is kept"}
    assert rows["inner.mode"]["help"] == "from metadata" and rows["size"]["help"] == ""
    assert rows["size"]["type"] == "[int, int] or null" and rows["size"]["default"] == "null"
