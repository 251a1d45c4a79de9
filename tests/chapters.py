"""Find the book's chapters from _toc.yml and execute one, as the book build does."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def toc_files(toc_path: Path = ROOT / "_toc.yml") -> list[Path]:
    """Every source file named in the table of contents, root first, in reading order."""
    toc = yaml.safe_load(toc_path.read_text())
    names = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    paths = []
    for name in names:
        matches = [
            ROOT / f"{name}{ext}" for ext in (".md", ".ipynb") if (ROOT / f"{name}{ext}").exists()
        ]
        if not matches:
            raise FileNotFoundError(f"_toc.yml names {name!r} but no .md or .ipynb file exists")
        paths.append(matches[0])
    return paths


def is_notebook(path: Path) -> bool:
    """A MyST file is a notebook when its front matter carries a jupytext/kernelspec header."""
    if path.suffix == ".ipynb":
        return True
    head = path.read_text().split("\n---", 1)[0]
    return path.read_text().startswith("---") and "kernelspec" in head


def execute_chapter(path: Path, timeout: int = 900):
    """Run a chapter in a fresh kernel; raise CellExecutionError at the first failure."""
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MPLBACKEND", None)  # the kernel must use its inline backend, or figures vanish
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    # nbclient passes extra kwargs to the kernel manager's start_kernel (the kernel's environment).
    client.execute(env=env)
    return nb


# One execution per chapter per test session: tests/test_chapters.py checks each chapter runs,
# and tests/test_browser.py renders those same executed notebooks instead of running them again.
_EXECUTED: dict[Path, object] = {}


def executed(path: Path):
    """The chapter executed once in this process (a failure is remembered and raised again)."""
    path = Path(path).resolve()
    if path not in _EXECUTED:
        try:
            _EXECUTED[path] = execute_chapter(path)
        except Exception as err:  # noqa: BLE001 - re-raised to every caller below
            _EXECUTED[path] = err
    result = _EXECUTED[path]
    if isinstance(result, Exception):
        raise result
    return result


def stage_executed_book(dest: Path) -> Path:
    """A copy of the book in ``dest`` whose chapters are the executed notebooks, build-ready.

    The copy's _config.yml turns execution off; everything else (toc, extensions, assets,
    bibliography) is the book's own, so Sphinx renders the same pages `make book` does.
    """
    import shutil

    import nbformat

    dest.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    (dest / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    shutil.copy(ROOT / "_toc.yml", dest / "_toc.yml")
    shutil.copytree(ROOT / "book", dest / "book", dirs_exist_ok=True)
    for path in toc_files():
        if is_notebook(path):
            target = dest / path.relative_to(ROOT)
            target.unlink()
            nbformat.write(executed(path), target.with_suffix(".ipynb"))
    return dest


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
