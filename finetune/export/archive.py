"""What a ``.pt2`` archive may hold before ``torch.export.load`` sees it.

``torch.export.load`` runs code from a crafted file in several ways: weights and constants marked
``use_pickle`` are unpickled with ``weights_only=False``, custom and opaque constants with pickle,
the sample inputs fall back to ``weights_only=False`` when the safe loader refuses them, the
program's ``guards_code`` is ``exec``'d, its symbolic shapes go through ``sympy.sympify`` (which
``eval``s), and a graph node may name any callable under ``torch``. :func:`check_pt2` reads the
archive with torch's own zip reader and refuses all of these, so that what it lets through is
plain JSON, raw tensor bytes, and graph nodes that are ATen operators. The caller then loads the
same bytes it checked, never the file again.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError, excerpt
from .metadata import PT2_ENTRY

# Every record a finetune export has (names inside the archive's root folder); anything else
# (AOTInductor libraries, other programs, legacy pickled weights) is refused.
_RECORDS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+|extra/[\w.-]+"
)
_PAYLOADS = {"data/weights/model_weights_config.json": "weight_", "data/constants/model_constants_config.json": "tensor_"}
# Graph nodes may call ATen operators and the symbolic-size arithmetic torch.export writes itself.
_ATEN = re.compile(r"torch\.ops\.aten\.(\w+)\.(\w+)")
_SYMBOLIC = re.compile(r"_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|pow|neg|pos|eq|ne|lt|le|gt|ge)"
                       r"|torch\.sym_(not|int|float|ite|max|min|sqrt|sum)|math\.(trunc|ceil|floor)")
# A symbolic shape as torch.export prints it: ``Symbol('s77', positive=True, integer=True)``,
# ``Mul(Integer(2), ...)``. Names are sympy's constructors and assumptions, or symbols like ``s77``;
# with no attribute access, subscripts or other names, sympify's eval can only build an expression.
_EXPR_TOKEN = re.compile(r"\s+|\d+(\.\d+)?(e[-+]?\d+)?|'[A-Za-z_]\w*'|[A-Za-z_]\w*|\*\*|[-+*/%(),=<>!]")
_EXPR_NAMES = frozenset(
    "Symbol Integer Float Rational Add Mul Pow Mod Max Min FloorDiv CeilDiv ModularIndexing Where PythonMod "
    "CleanDiv CeilToInt FloorToInt TruncToInt IntTrueDiv FloatTrueDiv ToFloat LShift RShift Eq Ne Lt Le Gt Ge "
    "StrictLessThan LessThan StrictGreaterThan GreaterThan Equality Unequality And Or Not true false True False "
    "oo zoo nan positive negative integer nonnegative nonpositive real finite infinite commutative".split()
)
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")


def check_pt2(data: bytes, where: Path) -> str:
    """Check a ``.pt2`` archive's bytes and return finetune's metadata entry (JSON text).

    Raises:
        ExportError: not a zip archive written by ``torch.export.save``, no finetune metadata, or
            anything that loading would unpickle unsafely or run (named).
    """
    if not data.startswith(b"PK\x03\x04"):
        raise _refused(where, "it is not a zip archive (empty, truncated, or another kind of file)")
    try:
        from torch.export.pt2_archive._package import PT2ArchiveReader

        with PT2ArchiveReader(io.BytesIO(data)) as archive:  # the reader torch.export.load uses
            names = archive.get_file_names()
            unknown = [n for n in names if not _RECORDS.fullmatch(n)]
            if unknown:
                raise _refused(where, f"it holds {excerpt(unknown[0])}, which a finetune export never has "
                                      "(compiled code, another program, or pickled data)")
            if "models/model.json" not in names or f"extra/{PT2_ENTRY}" not in names:
                raise _refused(where, "it has no program or no finetune metadata")
            for config, prefix in _PAYLOADS.items():
                if config in names:
                    _check_payloads(_json(archive.read_string(config), where, config), prefix, config, where)
            _check_program(_json(archive.read_string("models/model.json"), where, "models/model.json"), where)
            if "data/sample_inputs/model.pt" in names:
                _check_sample_inputs(archive.read_bytes("data/sample_inputs/model.pt"), where)
            return archive.read_string(f"extra/{PT2_ENTRY}")
    except RuntimeError as exc:  # torch's zip reader: a damaged archive, or records outside its root folder
        raise _refused(where, f"torch cannot read it as an archive ({excerpt(exc, 160)})") from None
    except UnicodeDecodeError:
        raise _refused(where, "a JSON record in it is not UTF-8 text") from None


def _refused(where: Path, why: str) -> ExportError:
    return ExportError(f"{where} cannot be used as a finetune .pt2 export: {why}. Nothing in it was run.",
                       "Use a file that finetune export wrote, or export the run again.")


def _json(text: str, where: Path, name: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _refused(where, f"its {name} is not readable JSON") from None


def _check_payloads(config: Any, prefix: str, name: str, where: Path) -> None:
    """Weights and constants: raw tensor bytes only, never a pickle (``use_pickle``) or an object."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _refused(where, f"its {name} is not a payload table")
    for fqn, meta in entries.items():
        raw = isinstance(meta, dict) and meta.get("use_pickle") is False and isinstance(meta.get("tensor_meta"), dict)
        path = meta.get("path_name") if isinstance(meta, dict) else None
        if not raw or not isinstance(path, str) or not re.fullmatch(re.escape(prefix) + r"\d+", path):
            raise _refused(where, f"its {name} stores {excerpt(fqn)} as a pickled or custom object, which "
                                  "loading would unpickle with weights_only=False")


def _check_program(program: Any, where: Path) -> None:
    """The program's JSON: no guard code (torch ``exec``s it), symbolic shapes that are plain
    expressions (torch ``eval``s them), and nodes that call ATen operators, never another callable."""
    if not isinstance(program, dict) or program.get("guards_code", []) != []:
        raise _refused(where, "its program carries guard code, which loading would execute")
    stack: list[Any] = [program]
    while stack:  # iterative: a crafted file may nest deeper than Python recurses
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
            continue
        if not isinstance(value, dict):
            continue
        target = value.get("target")
        if "target" in value and not _allowed_target(target):  # a graph node (schema.Node)
            raise _refused(where, f"its graph calls {excerpt(target)}, which is not an ATen operator")
        expr = value.get("expr_str")
        if expr is not None and not _plain_expression(expr):
            raise _refused(where, f"its symbolic shape {excerpt(expr)} is not a plain expression "
                                  "(loading would evaluate it as Python)")
        stack.extend(value.values())


def _allowed_target(target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if _SYMBOLIC.fullmatch(target):
        return True
    aten = _ATEN.fullmatch(target)
    if aten is None:
        return False
    try:
        schema = getattr(getattr(torch.ops.aten, aten[1]), aten[2])._schema
    except (AttributeError, RuntimeError):
        return False  # torch has no such operator: loading would fail on it anyway
    # aten::from_file and aten::save read or write a file named in the graph
    return not any(arg.name == "filename" for arg in schema.arguments)


def _plain_expression(expr: Any) -> bool:
    if not isinstance(expr, str) or len(expr) > 10_000:
        return False
    pos = 0
    while pos < len(expr):
        token = _EXPR_TOKEN.match(expr, pos)
        if token is None:
            return False
        word = token[0]
        if (word[0].isalpha() or word[0] == "_") and word not in _EXPR_NAMES and not _SYMBOL_NAME.fullmatch(word):
            return False
        pos = token.end()
    return True


def _check_sample_inputs(blob: bytes, where: Path) -> None:
    """The sample inputs are a torch.save pickle that torch loads with ``weights_only=True`` and, when
    that fails, again with ``weights_only=False``: they must load the safe way (the same bytes then
    load the same way inside torch, so the unsafe retry never happens)."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on the way to refusing
            warnings.simplefilter("ignore")
            inputs = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception:  # the safe unpickler refuses in several types; any refusal is this one
        raise _refused(where, "its sample inputs are not plain tensors (loading would unpickle them with "
                              "weights_only=False)") from None
    if not isinstance(inputs, (tuple, dict)):
        raise _refused(where, "its sample inputs are not a tuple of tensors")
