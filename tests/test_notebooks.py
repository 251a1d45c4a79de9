"""The chapters a reader downloads as notebooks (.ipynb) open, validate and import moe_lab.

Each page's download menu offers the notebook MyST-NB builds from the chapter's MyST source
(book/_ext/notebook_download.py copies it next to the page's .md source). The fast tests here make
those notebooks the way the build does, with MyST-NB's own reader and no Sphinx build; the build
adds outputs when it executes, the cells are the same (the slow test checks this on a real build).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import yaml

from tests.chapters import ROOT, is_notebook, toc_files

NOTEBOOKS = [p for p in toc_files() if p.suffix == ".md" and is_notebook(p)]


def load_extension():
    path = ROOT / "book" / "_ext" / "notebook_download.py"
    spec = importlib.util.spec_from_file_location("notebook_download", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


notebook_download = load_extension()


def build_notebook(path: Path) -> nbformat.NotebookNode:
    """The notebook MyST-NB makes from a MyST-Markdown chapter, as in the book build."""
    from myst_nb.core.config import NbParserConfig
    from myst_nb.core.read import create_nb_reader
    from myst_parser.config.main import MdParserConfig

    text = path.read_text(encoding="utf-8")
    reader = create_nb_reader(str(path), MdParserConfig(), NbParserConfig(), text)
    assert reader is not None, f"{path.name}: MyST-NB does not read it as a notebook"
    # Written and read back as the .ipynb file a reader downloads.
    return nbformat.reads(nbformat.writes(reader.read(text)), as_version=4)


def without_magics(source: str) -> str:
    """Cell source with IPython magics and shell escapes blanked, so that `ast` can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.splitlines())


def imports_moe_lab(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "moe_lab" for alias in node.names)
    return isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "moe_lab"


def first_moe_lab_imports(nb: nbformat.NotebookNode) -> str | None:
    """The import statements of the first code cell that imports moe_lab (None: no such cell)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(without_magics(cell.source))
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        if any(imports_moe_lab(node) for node in imports):
            return "\n".join(ast.unparse(node) for node in imports)
    return None


# Runs in the venv's python, outside the checkout: each notebook's imports in a fresh namespace.
RUN_IMPORTS = """
import json, sys, traceback
results = {}
for name, code in json.loads(sys.stdin.read()).items():
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
        results[name] = None
    except BaseException:
        results[name] = traceback.format_exc()
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def import_results(tmp_path_factory):
    """Each notebook's first moe_lab imports, run once in one fresh process (torch loads once).

    The process starts in an empty folder with no PYTHONPATH, as a downloaded notebook's kernel
    would: moe_lab must come from the installed package, not from the checkout on the path.
    """
    blocks = {p.stem: first_moe_lab_imports(build_notebook(p)) for p in NOTEBOOKS}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MPLBACKEND")}
    proc = subprocess.run(
        [sys.executable, "-c", RUN_IMPORTS],
        input=json.dumps({k: v for k, v in blocks.items() if v}),
        capture_output=True, text=True, timeout=600, env=env,
        cwd=tmp_path_factory.mktemp("downloaded"),
    )
    assert proc.returncode == 0, proc.stderr
    return blocks, json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_notebook_chapter_is_offered():
    assert NOTEBOOKS, "_toc.yml lists no MyST-Markdown notebook chapters"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_opens_and_validates(path, tmp_path):
    nb = build_notebook(path)
    target = tmp_path / f"{path.stem}.ipynb"
    nbformat.write(nb, target)
    nb = nbformat.read(target, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert any(cell.cell_type == "code" for cell in nb.cells), f"{path.name} has no code cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_first_moe_lab_import_cell_runs(path, import_results):
    blocks, results = import_results
    if blocks[path.stem] is None:
        pytest.skip(f"{path.name} has no code cell that imports moe_lab")
    assert results[path.stem] is None, f"{path.name}:\n{blocks[path.stem]}\n{results[path.stem]}"


def test_imports_found_in_a_cell_with_magics_and_code():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("import moe_lab"),
        nbformat.v4.new_code_cell("import math\nprint(math.pi)"),
        nbformat.v4.new_code_cell("%matplotlib inline\nimport torch\n"
                                  "from moe_lab.routing import (\n    top_k_routing,\n)\nx = 1"),
    ])
    assert first_moe_lab_imports(nb) == "import torch\nfrom moe_lab.routing import top_k_routing"


# ---------------------------------------------------------------------------------------------
# The extension that puts the notebook in the page's download menu


def fake_page(tmp_path: Path, metadata: dict, suffix: str = ".md"):
    outdir = tmp_path / "_build" / "html"
    app = SimpleNamespace(
        builder=SimpleNamespace(format="html"),
        outdir=str(outdir),
        env=SimpleNamespace(metadata={"book/ch": metadata}),
    )
    context = {"page_source_suffix": suffix, "sourcename": f"book/ch{suffix}"}
    return app, context


def test_extension_offers_the_built_notebook(tmp_path):
    app, context = fake_page(tmp_path, {"kernelspec": {"name": "python3"}})
    built = notebook_download.built_notebook(Path(app.outdir), "book/ch")
    built.parent.mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(), built)
    notebook_download.offer_notebook(app, "book/ch", "page.html", context, doctree=object())
    assert context["ipynb_source"] == "book/ch.ipynb"
    copied = Path(app.outdir) / "_sources" / "book" / "ch.ipynb"
    assert copied.read_bytes() == built.read_bytes()


@pytest.mark.parametrize("metadata, suffix", [({}, ".md"), ({"kernelspec": {}}, ".ipynb")],
                         ids=["plain-markdown", "ipynb-source"])
def test_extension_leaves_other_pages_alone(tmp_path, metadata, suffix):
    app, context = fake_page(tmp_path, metadata, suffix)
    built = notebook_download.built_notebook(Path(app.outdir), "book/ch")
    built.parent.mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(), built)
    notebook_download.offer_notebook(app, "book/ch", "page.html", context, doctree=object())
    assert "ipynb_source" not in context
    assert not (Path(app.outdir) / "_sources").exists()


def test_config_enables_the_extension():
    sphinx = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]
    assert sphinx["local_extensions"]["notebook_download"] == "book/_ext"
    assert "notebook_download" in sphinx["config"]["extensions"]


@pytest.mark.slow
def test_built_pages_offer_their_notebooks(tmp_path):
    """A real build (execution off, to stay quick): each chapter page links its .ipynb."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    # The copied config lives outside the book: its extension folders must be absolute.
    sphinx = config["sphinx"]
    sphinx["local_extensions"] = {k: str(ROOT / v) for k, v in sphinx["local_extensions"].items()}
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config, allow_unicode=True))
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT),
         "--config", str(tmp_path / "_config.yml"), "--path-output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = tmp_path / "out" / "_build" / "html"
    for path in NOTEBOOKS:
        page = path.relative_to(ROOT).with_suffix("")
        text = (html / page.with_suffix(".html")).read_text(encoding="utf-8")
        assert f'href="../_sources/{page.as_posix()}.ipynb"' in text, f"{page}: no .ipynb link"
        offered = nbformat.read(html / "_sources" / f"{page.as_posix()}.ipynb", as_version=4)
        nbformat.validate(offered)
        assert [c.source for c in offered.cells] == [c.source for c in build_notebook(path).cells]
