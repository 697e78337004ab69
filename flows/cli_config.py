"""Config files and command-line flags for the ``lmlm`` commands: read, override, validate.

A mistake in a config is reported before any work starts, all at once, one line per problem, each
naming where it is (``file: path.to.field``), what is wrong, and what was given; an unknown field
suggests the field it was probably meant to be.
"""

from __future__ import annotations

import difflib
import json
import os
import types
import typing

from pydantic import BaseModel, ValidationError

from schemas.errors import UserInputError

DEFAULT_DB = os.environ.get("LMLM_WAREHOUSE", "out/demo/warehouse.duckdb")


def config_default(config: type[BaseModel], field: str):
    """A config field's default, for CLI defaults and help texts that must not drift from the config."""
    return config.model_fields[field].default


def load_config_file(path: str | None, model: type[BaseModel]) -> dict:
    """The mapping a JSON or YAML file holds ({} without a file); a syntax error is one line with file:line:column."""
    if not path:
        return {}
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise UserInputError(f"cannot read config {path}: {exc.strerror or exc} (give a JSON or YAML file of "
                             f"{model.__name__} fields)") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            problem = " ".join(filter(None, [getattr(exc, "context", None), getattr(exc, "problem", None)])) or str(exc)
            raise UserInputError(f"{where}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: the config must be a mapping of {model.__name__} fields, not a "
                             f"{type(data).__name__}")
    return data


def with_overrides(data: dict, overrides: dict) -> dict:
    """``data`` (a loaded config) with each override that is not None set at its dotted key ("a.b.c"): command-line
    flags win over the config file; a missing or null section on the way becomes a dict. Returns ``data``."""
    for key, value in overrides.items():
        if value is None:
            continue
        *sections, field = key.split(".")
        node = data
        for name in sections:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[field] = value
    return data


def validated(model: type[BaseModel], data: dict, what: str = "config", hint: str = "", source: str | None = None):
    """``model(**data)``, or a UserInputError listing every invalid field, one line each:
    ``<source or what>: <path>: <problem> (got <value>)``, with a did-you-mean for unknown fields and ``hint``
    (how to fix it) on the first line."""
    try:
        return model(**data)
    except ValidationError as exc:
        where = source or what
        lines = [f"{where}: {problem_line(model, err)}" for err in exc.errors()]
        if hint:
            lines[0] += f" ({hint})"
        raise UserInputError("\n".join(lines)) from None


def problem_line(model: type[BaseModel], err: dict) -> str:
    """One pydantic error as ``path: problem (got value)``; an unknown field names the closest known one."""
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        guess = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(sorted(known))}"
        return f"{path}: unknown field, {guess} (got {_short(err.get('input'))})"
    message = err["msg"]
    if err["type"] == "missing":
        return f"{path}: {message.lower()}"
    return f"{path}: {message} (got {_short(err.get('input'))})"


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the (nested) model at ``loc`` under ``model``; [] where there is none."""
    current: type | None = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None:
            if part.isdigit():  # an item of a list: keep the item type found below
                continue
            return []
        if part not in fields:
            return []
        current = _model_in(fields[part].annotation)
    return list(getattr(current, "model_fields", {}) or [])


def _model_in(annotation) -> type | None:
    """The pydantic model an annotation holds (``X``, ``X | None``, ``list[X]``, ``dict[str, X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
