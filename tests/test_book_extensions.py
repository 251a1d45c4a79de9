"""The book's local Sphinx extensions (book/_ext): chapter links and the offline-asset guard."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sphinx.errors import ExtensionError

from tests.chapters import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "book" / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chapter_links = load("chapter_links")
offline_assets = load("offline_assets")
inline_figures = load("inline_figures")


def test_chapter_links_follow_the_toc():
    subs = chapter_links.chapter_substitutions({"book/intro", "book/05_capacity"})
    assert subs["ch5"] == "{doc}`chapter 5 </book/05_capacity>`"
    assert subs["ch4"] == "chapter 4"  # not in the toc yet: plain text, no broken link
    assert sorted(subs) == sorted(f"ch{n}" for n in range(14))


def test_chapter_links_name_the_chapters_in_toc():
    """Every chapter _toc.yml lists is one chapter_links knows, under the same file name."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    numbered = [f for f in files if Path(f).name[:2].isdigit()]
    known = {f"book/{stem}" for stem in chapter_links.CHAPTERS.values()}
    assert set(numbered) <= known, set(numbered) - known


def fake_app(confdir: Path, mathjax_path="vendor/mathjax/es5/tex-chtml.js"):
    return SimpleNamespace(
        builder=SimpleNamespace(format="html"),
        confdir=str(confdir),
        config=SimpleNamespace(mathjax_path=mathjax_path),
    )


def test_offline_assets_present_in_this_checkout():
    offline_assets.check_assets(fake_app(ROOT))  # `make assets` has run (make test depends on it)


def test_offline_assets_missing_fail_the_build(tmp_path):
    with pytest.raises(ExtensionError, match="make assets"):
        offline_assets.check_assets(fake_app(tmp_path))


def test_offline_assets_refuse_a_cdn_mathjax():
    cdn = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"
    with pytest.raises(ExtensionError, match="mathjax_path"):
        offline_assets.check_assets(fake_app(ROOT, mathjax_path=cdn))


def test_config_points_at_the_vendored_assets():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]
    assert cfg["mathjax_path"].startswith("vendor/")
    assert all(not str(path).startswith("http") for path in cfg["nb_ipywidgets_js"])
    assert "sphinx_thebe" not in cfg["extensions"]
    for name in ("offline_assets", "inline_figures", "chapter_links"):
        assert name in cfg["extensions"]


def test_inline_figures_override_agg(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    inline_figures.use_inline_backend(None, None)
    assert os.environ["MPLBACKEND"] == inline_figures.INLINE
