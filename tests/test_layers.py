"""The layers point one way: flows -> training -> curation -> curation.lm, and only flows uses Prefect.

Every module under curation/, training/ and flows/ is parsed (``ast``, not imported, not regex)
and every import in it is checked, the ones inside functions (lazy imports) and
``importlib.import_module("...")`` calls with a literal name included. A failure lists each
offending import as ``file:line``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("curation", "training", "flows")
PREFECT = ("prefect", "prefect_dask", "prefect_ray")
# What the bottom layer may import of curation: itself and these leaf utilities (progress: the
# bar protocol the log-prob loops report through; it imports only curation.env)
LM_ALLOWED = ("curation.lm", "curation.errors", "curation.env", "curation.progress")


def _within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in ``source``, at any depth, relative ones resolved.

    ``from a.b import c`` yields ``a.b.c`` (c may be a module or a name in a.b: either way the
    import reaches into a.b). ``module`` is the dotted name of the file, for relative imports.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            yield node.lineno, node.args[0].value


def violation(module: str, target: str) -> str | None:
    """Why ``module`` may not import ``target`` (None: it may)."""
    if _within(module, "curation"):
        if _within(target, ("training", "flows")):
            return "curation never imports training or flows"
        if _within(target, PREFECT):
            return "curation never imports Prefect"
        if _within(module, "curation.lm") and _within(target, "curation") and not _within(target, LM_ALLOWED):
            return "curation.lm is the bottom layer: of curation it imports only curation.errors, curation.env and curation.progress"
    elif _within(module, "training"):
        if _within(target, "flows"):
            return "training never imports flows"
        if _within(target, PREFECT):
            return "training never imports Prefect"
    return None


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(path, root)
            source = path.read_text(encoding="utf-8")
            for line, target in imports(source, module, is_package=path.name == "__init__.py"):
                why = violation(module, target)
                if why:
                    found.append(f"{path.relative_to(root)}:{line}: imports {target}: {why}")
    return found


def test_layers_point_one_way() -> None:
    found = violations()
    assert not found, "layer violations:\n" + "\n".join(found)


def test_every_package_is_parsed() -> None:
    for package in PACKAGES:
        assert list((ROOT / package).rglob("*.py")), package
    assert (ROOT / "curation" / "lm" / "__init__.py").is_file()


# -- the checker itself --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module,source,offending",
    [
        ("curation.score.x", "import training.models\n", "training.models"),
        ("curation.score.x", "def f():\n    from training.models import load_model\n", "training.models.load_model"),
        ("curation.x", "from flows import tasks\n", "flows.tasks"),
        ("curation.x", "import prefect\n", "prefect"),
        ("training.x", "def f():\n    from prefect_dask import DaskTaskRunner\n", "prefect_dask.DaskTaskRunner"),
        ("training.x", "import flows.cli\n", "flows.cli"),
        ("curation.lm.x", "from curation.score import margins\n", "curation.score.margins"),
        ("curation.lm.x", "def f():\n    import curation.ingest\n", "curation.ingest"),
        ("curation.lm.x", "from curation import store\n", "curation.store"),
        ("curation.lm.x", "from .. import decide\n", "curation.decide"),
        ("curation.lm.x", "import importlib\nimportlib.import_module('curation.score.scoring')\n",
         "curation.score.scoring"),
    ],
)
def test_checker_catches(module: str, source: str, offending: str) -> None:
    found = [(line, t) for line, t in imports(source, module) if violation(module, t)]
    assert [t for _, t in found] == [offending]
    assert found[0][0] == source.count("\n", 0, source.index(offending.split(".")[-1])) + 1


@pytest.mark.parametrize(
    "module,source",
    [
        ("curation.lm.x", "from curation.errors import WinnowError\nfrom curation.env import environment\n"),
        ("curation.lm.x", "from curation.lm.tokenization import tokenize_pairs\nfrom . import hub\n"),
        ("curation.lm.x", "from curation.progress import progress_bar\n"),
        ("curation.score.x", "from curation.lm.logprobs import score_tokenized\nimport torch\n"),
        ("training.x", "from curation.lm.loading import load_model\nimport trl\n"),
        ("flows.x", "import prefect\nfrom training import stages\n"),
    ],
)
def test_checker_allows(module: str, source: str) -> None:
    assert not [t for _, t in imports(source, module) if violation(module, t)]


# SQL lives with the catalog: the schema and writers (store.py), the named reads (reads.py) and
# ingest's staging step (its duplicate/contradiction resolution is SQL over a temp table).
SQL_MODULES = ("curation/store.py", "curation/reads.py", "curation/ingest/__init__.py")
SQL_MARKERS = ("SELECT ", "INSERT ", "DELETE ", "UPDATE ", "COPY ", ".execute(", ".sql(")


def test_sql_lives_in_the_catalog_modules() -> None:
    """flows/ holds no SQL at all; curation and training reach the catalog through reads.py and store.py."""
    offending = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in SQL_MODULES:
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), start=1):
                if any(marker in line for marker in SQL_MARKERS):
                    offending.append(f"{rel}:{lineno}: {line.strip()[:80]}")
    assert not offending, "SQL outside the catalog modules:\n" + "\n".join(offending)
