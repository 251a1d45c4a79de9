"""Keep the Chinese message catalogs in step with the English sources (`make locale`).

A prose change in English must show up as a message to translate, never as a translation that
silently no longer matches. `update` does that in two steps:

1. Templates: Sphinx's gettext builder reads the book (through Jupyter Book, with the book's own
   configuration and extensions, and no notebook executed) and writes one .pot per page into a
   temporary folder.
2. Merge: babel merges each page's template into locale/zh_CN/LC_MESSAGES/<page>.po. A new
   message is added untranslated. A changed message is matched to the closest old translated
   one, marked fuzzy, and keeps the old translation (with the old msgid as `#| msgid`) as the
   translator's starting point; Sphinx does not use a fuzzy translation. A message that left
   the page is kept at the end as obsolete (`#~`) when it had a translation, and comes back
   with it if the English returns. A page with no catalog yet gets a new one; a catalog whose
   page is gone is reported and left alone. Catalogs whose messages did not change are not
   rewritten, and the layout (no line wrapping) is the one the catalogs were made with.

Source locations (`#: ../../book/05_capacity.md:12`) are written relative to _build/gettext
whatever folder the templates were built in, so an update shows only real changes.

    .venv/bin/python tools/locale_tools.py update [--locale-dir DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.pofile import normalize, read_po, unescape, write_po

sys.path.insert(0, str(Path(__file__).resolve().parent))
from book_editions import (  # noqa: E402
    ENGLISH,
    ROOT,
    BuildError,
    edition_config,
    run_logged,
    write_config,
)

LANGUAGE = "zh_CN"
LOCALE = ROOT / "locale"
# Where the catalogs' source locations are relative to (the gettext builder's usual folder).
GETTEXT_HOME = Path("_build") / "gettext"
HEADER = (
    "Chinese (zh_CN) messages of MoE Lab, page {page}.\n"
    "Made from the English sources with the gettext builder; translate msgstr only.\n"
    "Terms: book/appendix_b_glossary.md. Markup that must survive: tests/po_checks.py."
)


@dataclass
class Merge:
    """What an update changed in one catalog."""

    catalog: str
    created: bool = False
    added: list[str] = field(default_factory=list)
    fuzzy: list[str] = field(default_factory=list)
    obsolete: list[str] = field(default_factory=list)
    written: bool = False

    def summary(self) -> str:
        what = "new catalog" if self.created else (
            f"+{len(self.added)} new, ~{len(self.fuzzy)} changed (fuzzy), "
            f"-{len(self.obsolete)} obsolete")
        return f"{self.catalog}: {what}{'' if self.written else ' (unchanged)'}"


def previous_msgid(comments: list[str]) -> str:
    """The old msgid from the `#|` lines of a message, as babel read them (user comments).

    `dump` writes them as PO strings ("| msgid \"...\"", then "| \"...\"" lines); babel's
    own writer wraps them as plain text at 76 columns, which is read back by joining the lines.
    """
    parts = [comments[0][len("| msgid "):]] + [c[1:].strip() for c in comments[1:]]
    if all(len(p) >= 2 and p.startswith('"') and p.endswith('"') for p in parts):
        return "".join(unescape(p) for p in parts)
    return unescape(" ".join(parts))


def read_catalog(path: Path, locale: str | None = LANGUAGE) -> Catalog:
    """A catalog, with the `#| msgid` of its fuzzy messages read back as their previous msgid.

    babel reads `#|` lines as user comments ("| msgid ..."), which a later write would turn
    into "# | msgid" lines.
    """
    with path.open("rb") as f:
        catalog = read_po(f, locale=locale, abort_invalid=True)
    for message in [*catalog, *catalog.obsolete.values()]:
        previous = [c for c in message.user_comments if c.startswith("|")]
        if previous and previous[0].startswith("| msgid "):
            message.previous_id = [previous_msgid(previous)]
        message.user_comments = [c for c in message.user_comments if not c.startswith("|")]
    return catalog


def dump(catalog: Catalog) -> bytes:
    """The catalog as the locale/ files are written: unwrapped, old msgids as `#| msgid`.

    babel writes msgid and msgstr unwrapped with width 0 but always wraps comments, `#|`
    included, at 76 columns as plain text; so the `#|` lines are written here, as PO strings.
    """
    out = io.BytesIO()
    write_po(out, catalog, width=0, include_previous=False)
    text = out.getvalue().decode("utf-8")
    for message in catalog:
        if not (message.id and message.previous_id):
            continue
        block = f"\nmsgid {normalize(message.id, width=0)}\nmsgstr"
        old = f"msgid {normalize(message.previous_id[0], width=0)}"
        comment = "".join(f"\n#| {line}" for line in old.split("\n"))
        text = text.replace(block, comment + block, 1)
    return text.encode("utf-8")


def same_but_date(a: bytes, b: bytes) -> bool:
    """Equal catalogs but for the POT-Creation-Date header, which changes on every run."""
    date = re.compile(rb'^"POT-Creation-Date: [^"]*"$', re.M)
    return date.sub(b"", a) == date.sub(b"", b)


def messages_of(catalog: Catalog) -> dict:
    """Everything a merge may change, header left out (its dates change on every run)."""
    live = {m.id: (m.string, m.fuzzy, tuple(m.previous_id or ()), tuple(m.locations))
            for m in catalog if m.id}
    dead = {key: m.string for key, m in catalog.obsolete.items()}
    return {"live": live, "obsolete": dead}


def canonical_locations(template: Catalog, pot_root: Path, source: Path) -> None:
    """Rewrite each location as if the gettext builder had written into source/_build/gettext."""
    home = source / GETTEXT_HOME
    for message in template:
        fixed = []
        for filename, line in message.locations:
            absolute = (pot_root / filename).resolve()
            try:
                fixed.append((Path(os.path.relpath(absolute, home)).as_posix(), line))
            except ValueError:  # another drive (Windows): keep what the builder wrote
                fixed.append((filename, line))
        message.locations = fixed


def merge(template: Catalog, po_path: Path, page: str, dry_run: bool = False) -> Merge:
    """Merge one page's template into its catalog at ``po_path`` (created when missing)."""
    result = Merge(po_path.name)
    if not po_path.exists():
        catalog = Catalog(locale=LANGUAGE, project="MoE Lab", header_comment="")
        catalog.header_comment = "\n".join(f"# {line}" for line in
                                           HEADER.format(page=page).splitlines())
        catalog.last_translator = "MoE Lab"
        catalog.language_team = "MoE Lab <zh_CN>"
        for message in template:
            if message.id:
                catalog[message.id] = message.clone()
        catalog.creation_date = template.creation_date
        result.created = True
        result.added = [m.id for m in catalog if m.id]
    else:
        catalog = read_catalog(po_path)
        before = messages_of(catalog)
        ids = {m.id for m in template if m.id}
        # English that came back: its obsolete translation returns with it.
        for key in [k for k in catalog.obsolete if k in ids]:
            catalog[key] = catalog.obsolete.pop(key)
        known = {m.id for m in catalog if m.id}
        previous = {m.id: m.previous_id for m in catalog if m.id and m.previous_id}
        catalog.update(template, no_fuzzy_matching=False, update_header_comment=False,
                       keep_user_comments=True, update_creation_date=True)
        # babel drops the old msgid of a message that was fuzzy already: keep it while fuzzy.
        for message in catalog:
            if message.fuzzy and not message.previous_id and message.id in previous:
                message.previous_id = previous[message.id]
        # An obsolete message with no translation holds nothing worth keeping.
        for key in [k for k, m in catalog.obsolete.items() if not m.string]:
            del catalog.obsolete[key]
        result.added = [m.id for m in catalog if m.id and m.id not in known and not m.previous_id]
        result.fuzzy = [m.id for m in catalog if m.id and m.id not in known and m.previous_id]
        result.obsolete = [k for k in catalog.obsolete if k not in before["obsolete"]]
        if same_but_date(dump(catalog), po_path.read_bytes()):
            return result
    result.written = True
    if not dry_run:
        po_path.parent.mkdir(parents=True, exist_ok=True)
        po_path.write_bytes(dump(catalog))
    return result


def build_templates(source: Path, outdir: Path) -> Path:
    """Write the .pot files of every page of the book in ``source``; return their folder.

    Jupyter Book's gettext builder with execution off: reading needs no kernel, and messages
    are prose only (code cells and outputs are not messages). No -W: pages may warn about
    outputs that only an executed build has (glue keys), which does not change their text.
    """
    config = edition_config(source, ENGLISH, execute="off")
    config["sphinx"].setdefault("config", {})["gettext_compact"] = False
    path = write_config(config, outdir / "_config.yml")
    exe = Path(sys.executable).with_name("jupyter-book")
    run_logged([str(exe), "build", str(source), "--config", str(path), "--path-output",
                str(outdir), "--builder", "custom", "--custom-builder", "gettext", "--all"],
               cwd=source, quiet=True)
    return outdir / "_build" / "gettext"


def update(source: Path = ROOT, locale_dir: Path = LOCALE, dry_run: bool = False,
           pot_root: Path | None = None) -> list[Merge]:
    """Regenerate the templates from ``source`` (or use ``pot_root``) and merge them all."""
    catalogs = locale_dir / LANGUAGE / "LC_MESSAGES"
    with tempfile.TemporaryDirectory(prefix="moe-lab-pot-") as tmp:
        root = pot_root or build_templates(source.resolve(), Path(tmp))
        results = []
        pots = sorted(root.rglob("*.pot"))
        if not pots:
            raise RuntimeError(f"the gettext build wrote no .pot file under {root}")
        for pot in pots:
            page = pot.relative_to(root).with_suffix("").as_posix()
            template = read_catalog(pot, locale=None)
            canonical_locations(template, root, source.resolve())
            results.append(merge(template, catalogs / f"{page}.po", page, dry_run=dry_run))
        pages = {pot.relative_to(root).with_suffix("").as_posix() for pot in pots}
    for po in sorted(catalogs.rglob("*.po")):
        if po.relative_to(catalogs).with_suffix("").as_posix() not in pages:
            print(f"{po}: no page of the book has this catalog any more; left as it is")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("update", help="regenerate the .pot files and merge them into the .po")
    up.add_argument("--source", type=Path, default=ROOT, help="the book (default: this checkout)")
    up.add_argument("--locale-dir", type=Path, default=LOCALE,
                    help="the catalogs' root (default: locale/); point it at a copy to try")
    up.add_argument("--dry-run", action="store_true", help="report, write nothing")
    args = parser.parse_args(argv)
    try:
        results = update(args.source, args.locale_dir, args.dry_run)
    except (BuildError, RuntimeError, OSError) as err:
        print(f"locale_tools: {err}", file=sys.stderr)
        return 1
    for r in results:
        print(r.summary())
    changed = sum(r.written for r in results)
    print(f"{changed} of {len(results)} catalogs {'would change' if args.dry_run else 'updated'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
