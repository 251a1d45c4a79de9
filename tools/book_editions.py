"""Build the book's two editions with one command: English at _build/html/, Chinese at
_build/html/zh/ (`make book` runs `python tools/book_editions.py build`).

Both editions come from the same sources, so code, outputs and numbers are single-source; the
Chinese prose comes from Sphinx's gettext catalogs, locale/zh_CN/LC_MESSAGES/book/<page>.po
(messages without a translation, or marked fuzzy, stay English).

Each chapter executes once. The English build runs MyST-NB in `cache` mode on an emptied
execution cache, so every chapter executes as with `force` (a failing cell still fails the
build: `nb_execution_raise_on_error`) and its executed notebook is stored. The Chinese build
reads the same chapters, whose code cells hash the same, and takes their outputs from that
cache; its log is checked to make sure it executed nothing. Both builds run with `-W
--keep-going` and `--all`, so no page or output is left over from an earlier build.

_config.yml stays the one configuration (and `jupyter-book build .` alone still builds the
English book, executing every chapter). This module writes a copy per edition under
_build/editions/<language>/ holding only what differs: the execution mode and cache, the
language, the compiled catalogs, and the Chinese site title. The catalogs are compiled here
into _build/editions/locale/ (fuzzy messages left out, as msgfmt does), instead of by Sphinx
next to the .po files, so a build never writes into the translators' folder.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parents[1]
ENGLISH, CHINESE = "en", "zh_CN"
# Folder of each edition under the English site root (book/_ext/language_links.py links them).
FOLDERS = {ENGLISH: "", CHINESE: "zh"}
# The site title is configuration, not a message of a page (the search box's placeholder is set
# by book/_ext/language_links.py).
TITLES = {CHINESE: "MoE Lab：MoE 如何突破万张卡和万亿参数两个临界点"}
# MyST-NB's log line for a notebook it executes (myst_nb/core/execute/cache.py).
EXECUTING = "Executing notebook using"


class BuildError(RuntimeError):
    """A build step failed; the message says which and shows the end of its log."""


def edition_config(source: Path, language: str, *, execute: str, cache: Path | None = None,
                   locale_dir: Path | None = None) -> dict:
    """``source``/_config.yml with what the ``language`` edition changes.

    The copy lives elsewhere, and Jupyter Book resolves local_extensions against the config
    file's folder, so their paths become absolute; every other path is relative to the source.
    """
    config = yaml.safe_load((source / "_config.yml").read_text(encoding="utf-8"))
    sphinx = config.setdefault("sphinx", {})
    sphinx["local_extensions"] = {
        name: str((source / path).resolve())
        for name, path in (sphinx.get("local_extensions") or {}).items()
    }
    execution = config.setdefault("execute", {})
    execution["execute_notebooks"] = execute
    if cache is not None:
        execution["cache"] = str(cache.resolve())
    settings = sphinx.setdefault("config", {})
    settings["language"] = language
    if locale_dir is not None:
        settings["locale_dirs"] = [str(locale_dir.resolve())]
        settings["gettext_auto_build"] = False  # compiled by compile_catalogs
    if language in TITLES:
        config["title"] = TITLES[language]
    return config


def write_config(config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# A numbered title, "5. Capacity": the number and its dot (or parenthesis).
NUMBERED = re.compile(r"^(\d+)([.)])(?=\s)")


def escape_numbered_title(msgid: str, msgstr: str) -> str:
    """Keep a translated numbered title a title.

    Sphinx translates a title by parsing ``msgstr`` followed by a line of "=" as a document.
    In Markdown a line that starts with "5. " is an ordered list item, so "5. 容量" came back
    as a list, Sphinx skipped it, and every chapter title stayed English. A msgid can start
    with "5. " only as a title (in a paragraph it would have been a list too), so the number's
    dot is escaped in such a msgstr: "5\\. 容量" reads "5. 容量".
    """
    if NUMBERED.match(msgid) and NUMBERED.match(msgstr):
        return NUMBERED.sub(r"\1\\\2", msgstr, count=1)
    return msgstr


def compile_catalogs(locale_src: Path, dest: Path, language: str = CHINESE) -> list[Path]:
    """Compile every ``<language>/LC_MESSAGES/**.po`` under ``locale_src`` into ``dest``.

    Fuzzy messages are left out (their translation may be stale). A catalog that does not
    parse stops the build with its file and line. Numbered titles are escaped for Markdown
    (`escape_numbered_title`).
    """
    src = locale_src / language / "LC_MESSAGES"
    shutil.rmtree(dest / language, ignore_errors=True)
    written = []
    for po in sorted(src.rglob("*.po")):
        try:
            with po.open("rb") as f:
                catalog = read_po(f, locale=language, abort_invalid=True)
        except Exception as err:  # babel's PoFileError, or a decoding error
            raise BuildError(f"{po}: cannot be read as a message catalog: {err}") from err
        for message in catalog:
            if message.id and isinstance(message.string, str) and message.string:
                message.string = escape_numbered_title(message.id, message.string)
        mo = dest / language / "LC_MESSAGES" / po.relative_to(src).with_suffix(".mo")
        mo.parent.mkdir(parents=True, exist_ok=True)
        with mo.open("wb") as f:
            write_mo(f, catalog, use_fuzzy=False)
        written.append(mo)
    return written


def run_logged(cmd: list[str], cwd: Path, quiet: bool = False,
               env: dict[str, str] | None = None) -> str:
    """Run ``cmd``, echoing its output unless ``quiet``; return the output; raise on failure."""
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, encoding="utf-8", errors="replace", env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not quiet:
            sys.stdout.write(line)
            sys.stdout.flush()
    if proc.wait() != 0:
        tail = "".join(lines[-80:])
        raise BuildError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    return "".join(lines)


def jupyter_book(source: Path, config: Path, path_output: Path | None = None,
                 quiet: bool = False, env: dict[str, str] | None = None) -> str:
    """`jupyter-book build` of ``source`` with ``config``, as strict as `make book` was."""
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe), "build", str(source), "--config", str(config), "-W", "--keep-going", "--all"]
    if path_output is not None:
        cmd += ["--path-output", str(path_output)]
    return run_logged(cmd, cwd=source, quiet=quiet, env=env)


def build_site(source: Path = ROOT, execute: str = "cache", quiet: bool = False,
               env: dict[str, str] | None = None) -> Path:
    """Build both editions of the book in ``source``; return the site folder (_build/html).

    ``execute`` is "cache" for `make book` (execute every chapter once, then reuse it) or "off"
    for a source whose chapters are already executed notebooks (tests/test_browser.py). ``env``
    is the builds' environment (default: this process's).
    """
    source = source.resolve()
    build = source / "_build"
    work = build / "editions"
    cache = build / ".jupyter_cache"
    if execute == "cache":
        shutil.rmtree(cache, ignore_errors=True)  # every chapter executes in this build
    timings = {}

    start = time.monotonic()
    en_config = write_config(edition_config(source, ENGLISH, execute=execute, cache=cache),
                             work / ENGLISH / "_config.yml")
    jupyter_book(source, en_config, quiet=quiet, env=env)
    html = build / "html"
    timings[ENGLISH] = time.monotonic() - start

    start = time.monotonic()
    locale_dir = work / "locale"
    compile_catalogs(source / "locale", locale_dir)
    zh_config = write_config(
        edition_config(source, CHINESE, execute=execute, cache=cache, locale_dir=locale_dir),
        work / CHINESE / "_config.yml",
    )
    log = jupyter_book(source, zh_config, path_output=work / CHINESE, quiet=quiet, env=env)
    executed = log.count(EXECUTING)
    if executed:
        raise BuildError(
            f"the {CHINESE} build executed {executed} notebook(s) instead of reusing the English "
            f"build's outputs from {cache}: a chapter changed between the two builds, or its "
            "code cells are not read the same way in both"
        )
    target = html / FOLDERS[CHINESE]
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(work / CHINESE / "_build" / "html", target)
    timings[CHINESE] = time.monotonic() - start

    print("editions built: " + ", ".join(
        f"{lang} -> {(html / FOLDERS[lang]).relative_to(source)}/ in {t:.0f} s"
        for lang, t in timings.items()), flush=True)
    return html


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build both editions into _build/html (and html/zh)")
    b.add_argument("--source", type=Path, default=ROOT)
    b.add_argument("--execute", choices=["cache", "off"], default="cache")
    args = parser.parse_args(argv)
    try:
        build_site(args.source, execute=args.execute)
    except BuildError as err:
        print(f"book_editions: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
