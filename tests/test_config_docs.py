"""docs/configs.md documents every config key with its default, and nothing else.

The keys come from the code: the sections of ``trainer.config.Config`` and each registered
model's options class. A key added to the code and not to the page fails here, and so does a
documented key the code lacks, or a default on the page that is not the code's.
"""
import dataclasses
import pathlib
import re

import yaml

import models
from trainer import config as config_lib

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configs.md"
KEY = re.compile(r"`([a-z0-9_]+(?:\.[a-z0-9_]+)?)`")
NONE = "none"


def documented() -> tuple[dict, dict]:
    """``({key: default cell}, {model name: {option: default cell}})`` from the page's tables."""
    keys, options, model = {}, {}, None
    for line in PAGE.read_text().splitlines():
        heading = re.match(r"^### `(\w+)`$", line)
        if heading:
            model = heading.group(1)
            options[model] = {}
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        (key,) = KEY.fullmatch(cells[0]).groups()
        table = keys if model is None else options[model]
        assert key not in table, f"{key} is documented twice ({model or 'config'})"
        table[key] = cells[1]
    return keys, options


def code_keys() -> dict:
    keys = {"workdir": config_lib.Config.workdir}
    for section, cls in config_lib._SECTIONS.items():
        for field in dataclasses.fields(cls):
            if (section, field.name) != ("model", "options"):  # a model's options: below
                keys[f"{section}.{field.name}"] = _default(field)
    return keys


def _default(field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _same_default(cell: str, default) -> bool:
    if default is None:
        return cell == NONE
    literal = re.fullmatch(r"`([^`]*)`", cell)
    if literal is None:
        return False
    value = yaml.safe_load(literal.group(1)) if literal.group(1) else ""
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = float(value)  # YAML reads 1e-5 as a string
        except ValueError:
            return False
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def test_every_config_key_is_documented_once_with_its_default():
    on_page, _ = documented()
    in_code = code_keys()
    assert sorted(set(in_code) - set(on_page)) == [], "keys missing from docs/configs.md"
    assert sorted(set(on_page) - set(in_code)) == [], "keys on docs/configs.md the code lacks"
    wrong = {k: (on_page[k], in_code[k]) for k in in_code if not _same_default(on_page[k], in_code[k])}
    assert wrong == {}, "(page, code) defaults differ"


def test_every_model_option_is_documented_with_its_default():
    _, on_page = documented()
    assert sorted(on_page) == models.available_models()
    for name in models.available_models():
        fields = dataclasses.fields(models.get_spec(name).config_cls)
        in_code = {f"model.{f.name}": _default(f) for f in fields}
        assert sorted(set(in_code) ^ set(on_page[name])) == [], f"model {name}: options differ"
        wrong = {k: (on_page[name][k], v) for k, v in in_code.items()
                 if not _same_default(on_page[name][k], v)}
        assert wrong == {}, f"model {name}: (page, code) defaults differ"


def test_the_default_check_reads_literals():
    assert _same_default("`1e-8`", 1e-8) and _same_default("`0.003`", 3e-3)
    assert _same_default("`true`", True) and not _same_default("`1`", True)
    assert _same_default('`""`', "") and _same_default("none", None)
    assert not _same_default("`0.95`", 0.9) and not _same_default("none", 0)
