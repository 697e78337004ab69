"""Config files and command-line flags for the ``lmlm`` commands: read, override, validate."""

from __future__ import annotations

import json
import os

from schemas.errors import UserInputError

DEFAULT_DB = os.environ.get("LMLM_WAREHOUSE", "out/demo/warehouse.duckdb")


def load_config_file(path: str | None, model):
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f) if path.endswith(".json") else __import__("yaml").safe_load(f)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read config {path}: {exc} (give a JSON or YAML file of {model.__name__} fields)")
    return data or {}


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


def validated(model, data: dict, what: str = "config", hint: str = ""):
    """``model(**data)``, or one error line naming the first invalid field (and ``hint``, how to fix it)."""
    from pydantic import ValidationError

    try:
        return model(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserInputError(f"invalid {what}: {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}"
                        + (f" ({hint})" if hint else "")) from None
