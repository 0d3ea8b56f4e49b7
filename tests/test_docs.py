"""The README and the documentation tell the truth: short enough to read, every command in the
README and the getting-started page runs as written (offline ones to their end, the others up to
where they would need internet, a GPU or the CIFAR-10 copy), every figure names a results file that
exists, every link resolves, the generated pages match the code, and the site builds strictly.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO_ROOT
from finetune.cli import app

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
GETTING_STARTED = DOCS / "getting-started.md"
MAX_README_LINES = 250

# Every `finetune` command of the README and the getting-started page, in the order they appear,
# and what it must do when run as written in an empty folder holding a copy of recipes/, with no
# network, an empty hub cache and no CIFAR-10 copy:
#   ("ok",)               runs to its end, exit 0;
#   ("error", phrase)     a one-paragraph error naming `phrase` (the documented offline or
#                         missing-input behaviour), exit 1, nothing else;
#   ("dry-run", phrase)   an experiment that would train for hours on real data: run with --dry-run
#                         added, which validates every variant and checks what it needs; exit 0, or
#                         exit 1 naming `phrase` when what it needs is not on this machine.
# A command added to the docs without an entry here fails test_every_documented_command_is_listed.
README_COMMANDS = {
    "finetune run recipes/deit_tiny_cifar.yaml": ("error", "hf download timm/deit_tiny_patch16_224.fb_in1k"),
    "finetune run recipes/quick_cpu.yaml": ("ok",),
    "finetune run recipes/deit_tiny_cifar.yaml optim.lr=3e-4 train.epochs=3 name=lr3e-4":
        ("error", "hf download timm/deit_tiny_patch16_224.fb_in1k"),
    "finetune validate recipes/deit_tiny_cifar.yaml optim.lrr=3e-4": ("error", "Did you mean 'optim.lr'?"),
    "finetune ls": ("ok",),
    "finetune eval runs/deit_tiny_cifar": ("error", "runs/deit_tiny_cifar"),
    "finetune predict runs/deit_tiny_cifar cat.jpg --topk 3": ("error", "cat.jpg does not exist"),
    "finetune resume runs/deit_tiny_cifar": ("error", "runs/deit_tiny_cifar"),
    "finetune run recipes/vit_cifar_cpu_15min.yaml data.name=imagefolder data.root=data/cifar10-jpeg":
        ("error", "data/cifar10-jpeg"),
    "finetune run recipes/vit_cifar_cpu_60min.yaml data.name=imagefolder data.root=data/cifar10-jpeg":
        ("error", "data/cifar10-jpeg"),
    "finetune compare recipes/transfer_pos_embed.yaml data.name=imagefolder data.root=data/cifar10-jpeg":
        ("dry-run", "runs/transfer_pretrain"),
    "finetune compare recipes/compare_cifar.yaml": ("dry-run", "deit_tiny_patch16_224"),
    "finetune sweep recipes/vit_lab_cifar.yaml --grid optim.lr=1e-3,3e-4 --grid data.batch_size=32,128":
        ("dry-run", None),
    "finetune compare recipes/transfer_study.yaml --only 'full_*' --dry-run": ("error", "runs/transfer_pretrain"),
    "finetune run recipes/transfer_pretrain.yaml data.name=imagefolder data.root=data/cifar10-jpeg "
    "train.precision=fp32": ("error", "data/cifar10-jpeg"),
    "finetune compare recipes/transfer_study.yaml data.name=imagefolder data.root=data/cifar10-jpeg":
        ("dry-run", "runs/transfer_pretrain"),
}
GETTING_STARTED_COMMANDS = {
    "finetune run recipes/quick_cpu.yaml": ("ok",),
    "finetune run recipes/quick_cpu.yaml optim.lr=3e-3 name=quick_lr3e-3": ("ok",),
    "finetune eval runs/quick_lr3e-3": ("ok",),
    "finetune report runs/quick_cpu runs/quick_lr3e-3 --out runs/quick_report": ("ok",),
    "finetune ls": ("ok",),
    "finetune validate recipes/quick_cpu.yaml train.epochs=3 --show": ("ok",),
    "finetune validate recipes/quick_cpu.yaml optim.lrr=3e-3": ("error", "Did you mean 'optim.lr'?"),
    "finetune run recipes/deit_tiny_cifar.yaml": ("error", "hf download timm/deit_tiny_patch16_224.fb_in1k"),
    "finetune run recipes/deit_tiny_cifar.yaml data.name=imagefolder data.root=my_photos data.image_size=224":
        ("error", "hf download timm/deit_tiny_patch16_224.fb_in1k"),
    "finetune run recipes/vit_cifar_cpu.yaml data.name=imagefolder data.root=data/cifar10-jpeg":
        ("error", "data/cifar10-jpeg"),
    "finetune predict runs/vit_cifar_cpu data/cifar10-jpeg/test/cat/0000.jpg --topk 3":
        ("error", "data/cifar10-jpeg/test/cat/0000.jpg does not exist"),
}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^ *```bash\n(.*?)^ *```", text, re.S | re.M)


def documented_commands(path: Path) -> list[str]:
    """The `finetune ...` lines of a page's bash blocks, comments cut, `.venv/bin/` dropped."""
    commands = []
    for block in bash_blocks(path.read_text()):
        for line in block.splitlines():
            line = re.split(r"\s+#", line.strip(), maxsplit=1)[0].strip()
            line = re.sub(r"^\.venv/bin/", "", line)
            if line.startswith("finetune "):
                commands.append(" ".join(line.split()))
    return commands


def outside_code(text: str) -> str:
    """The page without its fenced code blocks."""
    return re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)


# --------------------------------------------------------------------------------------------
# Length, structure and links
# --------------------------------------------------------------------------------------------


def test_readme_is_short_and_links_every_documentation_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; keep it under {MAX_README_LINES}"
    text = README.read_text()
    for page in ("getting-started", "recipes", "data", "runs", "distributed", "comparing", "export", "inspect",
                 "cli", "library", "api", "results", "benchmarks", "robustness", "architecture", "cifar-copy",
                 "reference/recipe", "reference/cli"):
        assert f"](docs/{page}.md" in text, f"README.md does not link docs/{page}.md"


def slug(heading: str) -> str:
    """The anchor GitHub and mkdocs give a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def headings(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", outside_code(path.read_text()), re.M)}


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    prose = re.sub(r"`[^`\n]+`", "", outside_code(page.read_text()))  # inline code is not a link
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name} links {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in headings(path), f"{page.name} links {target}: no such heading in {path.name}"


# --------------------------------------------------------------------------------------------
# Figures and their sources
# --------------------------------------------------------------------------------------------

RESULTS_PATH = re.compile(r"(?:benchmarks/results|docs/results)/[\w./{},-]*[\w}/]")
# A measured figure: a percentage with decimals, a throughput, or minutes of training.
FIGURE = re.compile(r"\d+\.\d+ ?%|\d[\d,]* ?(?:img|images)/s|\d+(?:\.\d+)? ?(?:training )?min(?:utes)?\b")


def expand(path: str) -> list[str]:
    """`a/b.{md,json}` -> [`a/b.md`, `a/b.json`]."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    return [p for part in match.group(1).split(",") for p in expand(path[:match.start()] + part + path[match.end():])]


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_results_file_named_exists(page):
    for named in RESULTS_PATH.findall(page.read_text()):
        for path in expand(named.rstrip(".")):
            assert (REPO_ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


def sections(text: str) -> list[str]:
    return re.split(r"^## ", text, flags=re.M)


def test_every_figure_in_the_readme_names_its_results_file():
    """Each README section that quotes a measured figure names a results file (checked above to exist)."""
    for section in sections(README.read_text()):
        figures = FIGURE.findall(outside_code(section))
        if figures:
            assert RESULTS_PATH.search(section), (
                f"README section {section.splitlines()[0]!r} quotes {figures[:3]} but names no file under "
                "benchmarks/results/ or docs/results/")


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_every_docs_page_with_figures_names_its_results_files(page):
    """Per section of each page: a measured figure comes with a results file nearby."""
    if page.name in ("robustness.md", "architecture.md"):  # test observations, each named by its test
        return
    for section in sections(page.read_text()):
        figures = FIGURE.findall(outside_code(section))
        if figures:
            assert RESULTS_PATH.search(section), (
                f"{page.name}, section {section.splitlines()[0]!r}, quotes {figures[:3]} but names no results file")


def test_the_figure_check_catches_an_unsourced_figure():
    section = "Measured\n\nIt reached 81.20% in 12 min.\n"
    assert FIGURE.findall(outside_code(section)) and not RESULTS_PATH.search(section)
    assert expand("benchmarks/results/x.{md,json}") == ["benchmarks/results/x.md", "benchmarks/results/x.json"]


# --------------------------------------------------------------------------------------------
# Generated pages and the site
# --------------------------------------------------------------------------------------------


def test_generated_pages_match_the_code():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr


def test_recipe_reference_lists_every_key():
    from finetune.recipe.schema import Recipe, section_type

    text = (DOCS / "reference" / "recipe.md").read_text()

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            yield key
            sub = section_type(field.annotation)
            if sub is not None:
                yield from keys(sub, key + ".")

    missing = [k for k in keys(Recipe) if f"| `{k}` |" not in text]
    assert not missing, missing


def test_the_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            capture_output=True, text=True, cwd=REPO_ROOT, env={"PATH": "/usr/bin:/bin",
                                                                                "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    index = (tmp_path / "site" / "index.html").read_text()
    assert "Getting started" in index and "getting-started.html" in index
    api = (tmp_path / "site" / "api.html").read_text()
    assert "resize_pos_embed" in api and "doc-function" in api  # docstrings rendered, not just names


# --------------------------------------------------------------------------------------------
# Every command runs as written
# --------------------------------------------------------------------------------------------


def test_every_documented_command_is_listed():
    assert documented_commands(README) == list(README_COMMANDS), (
        "README.md's commands changed: update README_COMMANDS to say what each must do")
    assert documented_commands(GETTING_STARTED) == list(GETTING_STARTED_COMMANDS), (
        "getting-started.md's commands changed: update GETTING_STARTED_COMMANDS")


@pytest.fixture
def offline_folder(tmp_path, monkeypatch):
    """An empty folder with recipes/, no network, an empty hub cache and no dataset downloads."""
    from huggingface_hub import constants
    import torchvision.datasets.utils as tv_utils

    shutil.copytree(REPO_ROOT / "recipes", tmp_path / "recipes")
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "decode_cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a documented command tried to download a dataset in the test")

    monkeypatch.setattr(tv_utils, "download_url", refuse)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", refuse)
    return tmp_path


def check(command: str, expected: tuple) -> None:
    args = shlex.split(command)[1:]
    if expected[0] == "dry-run":
        args.append("--dry-run")
    result = CliRunner().invoke(app, args)
    output = result.output
    assert "Traceback" not in output, f"{command}\n{output}"
    if expected[0] == "ok":
        assert result.exit_code == 0, f"{command}\n{output}\n{result.exception!r}"
        return
    if expected[0] == "dry-run" and result.exit_code == 0:
        return
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), f"{command}\n{output}"
    text = "\n".join(line for line in result.stderr.splitlines() if not line.endswith(" ...")).strip()
    if expected[0] == "error":
        assert text.startswith("error: ") and "\n\n" not in text, f"{command}\n{text}"
    assert expected[1] is None or expected[1] in " ".join(text.split()), f"{command}: {expected[1]!r} not in\n{text}"


def test_readme_commands_run_as_written(offline_folder):
    for command, expected in README_COMMANDS.items():
        check(command, expected)
    assert (offline_folder / "runs" / "quick_cpu" / "model.safetensors").is_file()
    assert not (offline_folder / "runs" / "deit_tiny_cifar").exists()  # refused before writing anything


def test_getting_started_commands_run_in_order(offline_folder):
    for command, expected in GETTING_STARTED_COMMANDS.items():
        check(command, expected)
    assert (offline_folder / "runs" / "quick_report" / "report.md").is_file()


STUDY_TABLE = re.compile(r"<!-- study-table: made by tools/study_table.py (\S+)( --costs)? -->\n(.*?)\n<!-- /study-table -->", re.S)


def test_the_study_tables_are_made_from_the_committed_results_file():
    """The README's head-only vs full vs scratch table and the results page's cost table are
    tools/study_table.py's output for the committed study.csv, so every figure in them can be
    regenerated from that file."""
    tables = {page.name: STUDY_TABLE.findall(page.read_text()) for page in (README, DOCS / "results.md")}
    assert [costs for _, costs, _ in tables["README.md"]] == [""], "README.md needs one study table between markers"
    assert " --costs" in [costs for _, costs, _ in tables["results.md"]], "docs/results.md has no cost table"
    for page, found in tables.items():
        for csv_name, costs, shown in found:
            result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "study_table.py"),
                                     str(REPO_ROOT / csv_name), *costs.split()], capture_output=True, text=True, check=True)
            assert shown == result.stdout.strip(), f"{page}: the table made from {csv_name}{costs} differs"
            if costs:
                assert " s |" in shown and "| - |" not in shown  # every cell a measured time
            else:
                assert "± " in shown  # means with a spread over seeds, not single runs


def test_the_convergence_table_is_made_from_the_committed_results_file():
    """The results page's "long enough?" table is tools/study_convergence.py's output for the
    committed convergence.csv (every run's last rise of validation top-1)."""
    text = (DOCS / "results.md").read_text()
    match = re.search(r"<!-- convergence-table: made by tools/study_convergence.py --from-csv (\S+) -->\n(.*?)\n"
                      r"<!-- /convergence-table -->", text, re.S)
    assert match, "docs/results.md has no convergence table between its markers"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "study_convergence.py"), "--from-csv",
                             str(REPO_ROOT / match.group(1))], capture_output=True, text=True, check=True)
    assert match.group(2) == result.stdout.strip()
    assert match.group(2).count("\n| ") >= 2  # a row per training-set size
