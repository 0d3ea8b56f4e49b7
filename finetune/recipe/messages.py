"""Turning pydantic's ValidationError into one message line per bad field: where the value came
from (the file or an override), the dotted key, and what was expected; and the valid keys, with
the nearest one to suggest for an unknown key."""

from __future__ import annotations

import difflib
from typing import Any, get_origin

from pydantic import BaseModel, ValidationError

from .schema import Recipe, describe_type, section_type, short_repr


def valid_keys() -> list[str]:
    """All dotted leaf keys of the schema, e.g. ``optim.lr`` and ``data.augment.hflip``."""

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        keys = []
        for name, field in model.model_fields.items():
            section = section_type(field.annotation)
            keys += walk(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"]
        return keys

    return walk(Recipe, "")


def mapping_keys() -> list[str]:
    """The leaf keys whose value is a mapping of free names (``model.args``): ``model.args.depth``
    names an entry of one, not a key of the schema."""
    return [k for k in valid_keys() if get_origin(_field(k).annotation) is dict]


def overlaps(a: str, b: str) -> bool:
    """Whether two dotted keys set the same value: equal, or one inside the other
    (``model.args`` and ``model.args.depth``)."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def _field(dotted: str) -> Any:
    model: Any = Recipe
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = section_type(model.model_fields[part].annotation)
    return model.model_fields[leaf]


def suggest_key(path: list[str]) -> str | None:
    """Nearest valid key to an unknown dotted key: a close sibling, the same leaf elsewhere, or any."""
    keys = valid_keys()
    parent, leaf = path[:-1], path[-1]
    model: type[BaseModel] | None = Recipe
    for part in parent:
        model = (
            section_type(model.model_fields[part].annotation)
            if model and part in model.model_fields
            else None
        )
    prefix = "".join(f"{p}." for p in parent)
    # The same name in another section first (train.lr -> optim.lr), then a close one in this section.
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    if model:
        siblings = difflib.get_close_matches(leaf, list(model.model_fields), n=1, cutoff=0.6)
        if siblings:
            return prefix + siblings[0]
    anywhere = difflib.get_close_matches(".".join(path), keys, n=1, cutoff=0.6)
    return anywhere[0] if anywhere else None


def _field_path(loc: tuple) -> tuple[list[str], Any]:
    """Schema field named by a pydantic error location, dropping union tags and tuple indices."""
    model: type[BaseModel] | None = Recipe
    path, annotation = [], None
    for item in loc:
        if model is None or item not in model.model_fields:
            break
        path.append(item)
        annotation = model.model_fields[item].annotation
        model = section_type(annotation)
    return path, annotation


def _lookup(raw: Any, path: list[str]) -> Any:
    for part in path:
        raw = raw[part]
    return raw


_LIMITS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def error_lines(
    err: ValidationError, raw: dict, file_label: str, override_keys: dict[str, str]
) -> list[str]:
    """One message line per bad field, each starting with where the bad value came from."""

    def origin(dotted: str) -> str:
        # A key set (or whose section was set) on the command line is blamed on that override.
        for key, override in reversed(override_keys.items()):
            if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + "."):
                return f"override {short_repr(override)}"  # cut short: an override may hold a very long value
        return file_label

    by_field: dict[str, str] = {}
    is_constraint: dict[str, bool] = {}
    for error in err.errors():
        kind, loc = error["type"], error["loc"]
        if kind == "extra_forbidden":
            dotted = ".".join(str(p) for p in loc)
            hint = suggest_key([str(p) for p in loc])
            message = f"unknown key {dotted!r}." + (f" Did you mean {hint!r}?" if hint else "")
            by_field.setdefault(dotted, f"{origin(dotted)}: {message}")
            continue
        path, annotation = _field_path(loc)
        dotted = ".".join(path)
        if kind == "value_error":
            # Our own validators; cross-field ones (empty path) already name their fields.
            text = str(error["ctx"]["error"])
            if not path:
                for line in text.splitlines():
                    by_field[line] = f"{origin(line.split(':', 1)[0])}: {line}"
                continue
            message, constraint = text, True
        elif kind == "finite_number":
            message, constraint = f"must be a finite number, got {short_repr(error['input'])}", True
        elif kind in _LIMITS:
            limit = next(iter(error["ctx"].values()))  # ctx is {"gt": 0.0}, {"ge": 1}, ...
            message, constraint = f"must be {_LIMITS[kind]} {limit}, got {short_repr(error['input'])}", True
        else:
            try:
                given = _lookup(raw, path)
            except (KeyError, TypeError):
                given = error["input"]
            message, constraint = f"expected {describe_type(annotation)}, got {short_repr(given)}", False
        # A union reports one error per member; a range error means the type itself was right.
        if dotted not in by_field or (constraint and not is_constraint[dotted]):
            by_field[dotted] = f"{origin(dotted)}: {dotted}: {message}"
            is_constraint[dotted] = constraint
    return list(by_field.values())
