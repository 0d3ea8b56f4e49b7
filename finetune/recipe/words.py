"""Plain words for recipe types and values, for error messages and the generated reference."""

from __future__ import annotations

import reprlib
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section class an annotation names (``DataConfig``), or None for a plain value."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def describe_type(annotation: Any) -> str:
    """Plain-words type name for error messages: ``float | None`` -> 'a number or null'."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        words = [describe_type(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is tuple:
        element = {float: "numbers", int: "integers", str: "strings"}.get(args[0], "values")
        return f"a list of {element}" if args[-1] is Ellipsis else f"a list of {len(args)} {element}"
    if section_type(annotation):
        return "a section of keys (a mapping)"
    if origin is dict:
        return "a mapping of names to values"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, str(annotation)
    )


_SHORT = reprlib.Repr()  # Python 3.11's takes no arguments: set the limits one by one
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple = 3, 6, 8, 8
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def short_repr(value: Any) -> str:
    """``repr`` cut short, so that a huge or deeply nested bad value gives a short message quickly."""
    return _SHORT.repr(value)
