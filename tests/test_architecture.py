"""The package's shape, checked: which subpackage may import which (docs/architecture.md), no
function over 60 lines, no module over 500, every module with a docstring saying what it owns,
and the public names importable from ``finetune`` as before."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "finetune"
BASE = {"errors", "snapshot", "hub"}
# subpackage (or top-level module) -> what it may import of finetune; docs/architecture.md draws it.
MAY_IMPORT = {
    "errors": set(),
    "snapshot": {"errors"},
    "hub": set(),
    "recipe": {"errors"},
    "data": BASE | {"recipe"},
    "models": BASE | {"recipe"},
    "training": BASE | {"recipe", "data", "models", "__init__"},
    "runs": BASE | {"recipe", "data", "models", "training", "viz", "__init__"},
    "viz": BASE | {"data", "models", "training", "runs"},
    "experiments": BASE | {"recipe", "runs", "training", "viz"},
    "export": BASE | {"recipe", "data", "models", "runs"},
    "cli": BASE | {"recipe", "data", "models", "training", "runs", "experiments", "viz", "export"},
    "__init__": set(),
    "__main__": {"cli"},
}
VIZ_READS_OF_RUNS = {"runs.folder", "runs.records"}  # viz reads run folders; it never trains or writes one


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def owner(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def finetune_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported finetune module, line, only for type checking)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    package = list(path.relative_to(PACKAGE).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, node.module] if node.module else base)
            names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
            # ``from .. import __version__``: a name of the package itself, not a module
            found += [(name if name.split(".")[0] in MAY_IMPORT else "__init__", node.lineno, id(node) in typing_only)
                      for name in names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(m.removeprefix("finetune."), node.lineno, id(node) in typing_only)
                      for m in mods if m == "finetune" or m.startswith("finetune.")]
    return found


def test_every_subpackage_imports_only_what_it_may():
    wrong = []
    for path in modules():
        me = owner(path)
        for target, line, typing_only in finetune_imports(path):
            top = target.split(".")[0]
            if top == me or typing_only:
                continue
            if top not in MAY_IMPORT[me] or (me == "viz" and top == "runs" and target not in VIZ_READS_OF_RUNS):
                wrong.append(f"{path.relative_to(REPO_ROOT)}:{line} imports finetune.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_layering_has_no_cycle_but_runs_and_viz():
    # runs draws its end-of-run figures through viz, and viz reads run folders through runs'
    # folder and records modules, which import nothing of viz: no module-level cycle.
    edges = {(me, top) for me, allowed in MAY_IMPORT.items() for top in allowed}
    cycles = {(a, b) for a, b in edges if (b, a) in edges and a < b}
    assert cycles == {("runs", "viz")}
    for name in VIZ_READS_OF_RUNS:
        imported = {t.split(".")[0] for t, _, _ in finetune_imports(PACKAGE / (name.replace(".", "/") + ".py"))}
        assert "viz" not in imported, name


def test_no_function_over_60_lines_and_no_module_over_500():
    long = []
    for path in modules():
        source = path.read_text()
        if source.count("\n") > 500:
            long.append(f"{path.relative_to(REPO_ROOT)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)


def test_every_module_says_what_it_owns():
    silent = [str(p.relative_to(REPO_ROOT)) for p in modules()
              if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not silent, silent


@pytest.mark.parametrize("name", ["load_model", "resize_pos_embed", "resize_model_input", "set_trainable",
                                  "save_model", "create_model", "reset_head", "PRESETS", "attention_rollout",
                                  "count_parameters", "param_groups", "POS_EMBED_MODES", "FinetuneError"])
def test_the_public_api_is_where_it_was(name):
    import finetune

    assert name in finetune.__all__
    assert getattr(finetune, name) is not None
