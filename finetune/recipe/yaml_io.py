"""The YAML dialect of recipe and experiment files: a safe loader that reads ``1e-3`` as a number
and refuses duplicate keys, the dumper that writes resolved recipes, and the reading of a file
(at most 1 MiB of UTF-8 text) with every mistake a :class:`~finetune.errors.RecipeError`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError

class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float and rejects duplicate keys.

    PyYAML follows YAML 1.1, where a float needs a dot, so ``lr: 1e-3`` would be the string
    ``'1e-3'``; YAML 1.2 and every user read it as a number. A duplicate key would silently keep
    only the last value.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are resolved by the base class
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


class RecipeDumper(yaml.SafeDumper):
    """SafeDumper that writes lists inline (``betas: [0.9, 0.999]``) and sections as blocks."""


RecipeDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def parse_yaml(
    text: str, where: str, fix: str = "Check the indentation and write each entry as `key: value`."
) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # safe: a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if "could not determine a constructor for the tag" in str(err.problem):
            tag = str(err.problem).rsplit("tag", 1)[-1].strip(" '")
            raise RecipeError(
                f"{where}{at} uses the YAML tag {tag}. Recipes hold plain values only, and finetune never "
                "builds objects from tags (nothing was run).",
                "Write the value as plain YAML: a number, text, true/false, a list or a mapping.",
            ) from None
        raise RecipeError(f"{where}: YAML syntax error{at}: {err.problem or err.context}.", fix) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: YAML syntax error: {err}.", fix) from None
    except RecursionError:
        raise RecipeError(f"{where}: the YAML is nested too deeply to be a recipe.", fix) from None


RECIPE_MAX_BYTES = 1 << 20
"""Largest recipe or experiment file read (1 MiB); real ones are a few kB."""


def read_yaml_file(path: Path, what: str = "recipe") -> Any:
    """Read and parse a recipe or experiment file: at most 1 MiB, UTF-8 text, plain YAML.

    Raises:
        RecipeError: the file cannot be read, is too large, is not UTF-8 text, or is not valid YAML.
    """
    try:
        size = path.stat().st_size
        if size > RECIPE_MAX_BYTES:
            raise RecipeError(
                f"{what} {str(path)!r} is {size:,} bytes; a {what} is a short YAML file (at most "
                f"{RECIPE_MAX_BYTES:,} bytes are read).",
                "Check that you passed the right file.",
            )
        data = path.read_bytes()
    except OSError as err:
        raise RecipeError(f"cannot read {what} {str(path)!r}: {err.strerror or err}.") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {err.start} cannot be decoded): it looks like a "
            "binary file.",
            "Pass a YAML file; recipes are plain text (see `finetune ls`).",
        ) from None
    if "\x00" in text:
        raise RecipeError(f"{what} {str(path)!r} contains NUL bytes: it is not a text file.", "Pass a YAML file.")
    return parse_yaml(text, path.name)
