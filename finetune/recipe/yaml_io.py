"""The YAML dialect of recipe and experiment files: a safe loader that reads ``1e-3`` as a number
and refuses duplicate keys, the dumper that writes resolved recipes, and the reading of a file
(at most 1 MiB of UTF-8 text) with every mistake a :class:`~finetune.errors.RecipeError`."""

from __future__ import annotations

import os
import re
import stat
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

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # Every explicit tag is refused before anything is built, the safe ones too (`!!binary`,
        # `!!set`, `!!timestamp`): a recipe holds plain values, and a tag is never what was meant.
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag not in (None, "!"):
            raise _TagError(None, None, _short_tag(tag), event.start_mark)
        return super().compose_node(parent, index)

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


class _TagError(yaml.MarkedYAMLError):
    """An explicit YAML tag in a recipe; ``problem`` is the tag as written (``!!binary``)."""


def _short_tag(tag: str) -> str:
    """``tag:yaml.org,2002:binary`` -> ``!!binary``, as it was written."""
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix):] if tag.startswith(prefix) else tag


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
        if isinstance(err, _TagError) or "could not determine a constructor for the tag" in str(err.problem):
            tag = err.problem if isinstance(err, _TagError) else str(err.problem).rsplit("tag", 1)[-1].strip(" '")
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
    """Read and parse a recipe or experiment file: a regular file of at most 1 MiB, UTF-8 text,
    plain YAML.

    Raises:
        RecipeError: the file cannot be read, is not a regular file (a FIFO, a device: never
            opened for reading), is too large, is not UTF-8 text, or is not valid YAML.
    """
    data = _read_regular_file(path, what)
    if b"\x00" in data:  # no text holds NUL bytes, whatever its encoding
        raise RecipeError(
            f"{what} {str(path)!r} is not UTF-8 text: it holds NUL bytes (the first at byte {data.index(0)}), "
            "so it looks like a binary file.",
            "Pass a YAML file; recipes are plain text (see `finetune ls`).",
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise RecipeError(
            f"{what} {str(path)!r} is not UTF-8 text: byte {err.start} (0x{data[err.start]:02x}, line {line}, "
            f"column {column}) is not valid UTF-8. The file was probably saved in another encoding, such as "
            "Latin-1 or Windows-1252.",
            "Save it as UTF-8 (most editors offer it under 'Save with encoding'; or "
            "`iconv -f latin1 -t utf-8 OLD.yaml > NEW.yaml`).",
        ) from None
    return parse_yaml(text, path.name)


def _read_regular_file(path: Path, what: str) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most :data:`RECIPE_MAX_BYTES`.

    A path that is not a regular file (a FIFO, whose read would wait for a writer, or a device) is
    refused without being opened; the file is then opened without blocking and checked again on
    the open descriptor, so one swapped in after the check by name is not read either.
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # checked by name first: a FIFO or device is never opened
            raise RecipeError(*not_regular_file(path, mode, what))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as err:
        raise RecipeError(f"cannot read {what} {str(path)!r}: {err.strerror or err}.") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RecipeError(*not_regular_file(path, info.st_mode, what))
        if info.st_size > RECIPE_MAX_BYTES:
            raise RecipeError(
                f"{what} {str(path)!r} is {info.st_size:,} bytes; a {what} is a short YAML file (at most "
                f"{RECIPE_MAX_BYTES:,} bytes are read).",
                "Check that you passed the right file.",
            )
        chunks, size = [], 0
        while size <= RECIPE_MAX_BYTES:  # at most the limit and one byte, even if the file grows
            chunk = os.read(fd, RECIPE_MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise RecipeError(f"cannot read {what} {str(path)!r}: {err.strerror or err}.") from None
    finally:
        os.close(fd)
    if size > RECIPE_MAX_BYTES:
        raise RecipeError(f"{what} {str(path)!r} grew past {RECIPE_MAX_BYTES:,} bytes while it was read.",
                          "Check that you passed the right file.")
    return b"".join(chunks)


def not_regular_file(path: Path, mode: int, what: str = "recipe") -> tuple[str, str]:
    """The problem and fix for a path that exists but is not a regular file or a folder."""
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return (f"{what} {str(path)!r} is {kind}, not a regular file; finetune reads {what}s only from regular "
            "files and did not open it.", "Pass the path of a .yaml file.")
