"""Open every page of the built book, both editions, in headless Chromium and check what a
reader sees.

Each page must load with no console error and no request leaving localhost, with its math
typeset by the self-hosted MathJax, every image loaded, every saved widget rendered, every
internal link pointing at a page and anchor that exist, and a link to the same page in the other
language edition (English at the root, Chinese under zh/). On Chinese pages the Chinese text must
be drawn in a real CJK font, not as tofu (see `cjk_problems`). A screenshot of each page is saved
under _build/screenshots/.

By default the book is built from the current sources first, both editions with `-W
--keep-going` as `make book` builds them (tools/book_editions.py), except that each chapter is
the notebook already executed once in this test session (tests/chapters.py: `executed`), so no
chapter runs twice; set MOE_LAB_REUSE_HTML=1 to check an existing, fresh _build/html (from `make
book`, with its zh/) instead.
A second, one-page book built in a temporary folder from this file's FIXTURE page (math, a
matplotlib figure, widgets) and its Chinese catalog checks the offline machinery and the second
edition itself, whatever the chapters and catalogs contain: it is built the way `make book`
builds, so its Chinese page must take the executed outputs and widgets from the English build's
cache.
Chromium comes from the system (`make browser` installs it).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

from tests.chapters import ROOT, stage_executed_book, toc_files

sys.path.insert(0, str(ROOT / "tools"))
import book_editions  # noqa: E402

# Building the whole book happens in the first test's set-up: allow more than the default 900 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(45 * 60)]

REUSE_ENV = "MOE_LAB_REUSE_HTML"
SCREENSHOTS = ROOT / "_build" / "screenshots"
# Flags checked on the project's machines (TOOLCHAIN.md); Playwright adds --headless and a fresh
# temporary --user-data-dir itself.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Console errors tolerated, as (regex, reason). Keep it empty unless an error is outside the
# book's control and harmless.
CONSOLE_ALLOW: list[tuple[str, str]] = []
# Pages Sphinx writes besides the ones in _toc.yml.
GENERATED_PAGES = ["index.html", "genindex.html", "search.html"]
# Where the Chinese edition lies in the site (book/_ext/language_links.py links to it).
ZH = book_editions.FOLDERS[book_editions.CHINESE] + "/"
# The CJK families of the Chinese pages' font stack (book/_ext/static/moe-lab-editions.css).
EDITIONS_CSS = ROOT / "book" / "_ext" / "static" / "moe-lab-editions.css"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
WAIT_MS = 30_000


# ---------------------------------------------------------------------------------------------
# Building and serving


def build_site(source: Path, execute: str, **env_extra: str) -> Path:
    """Build both editions of the book in `source` as `make book` does; return the site."""
    shutil.rmtree(source / "_build", ignore_errors=True)
    shutil.copytree(ROOT / "locale", source / "locale", dirs_exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MPLBACKEND", None)  # as the Makefile does
    env.update(env_extra)
    try:
        return book_editions.build_site(source, execute=execute, quiet=True, env=env)
    except book_editions.BuildError as err:
        pytest.fail(f"book build failed: {str(err)[-6000:]}")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # signature fixed by the base class
        pass


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve `directory` over HTTP on a free localhost port; yields the base URL."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def chromium() -> Iterator[object]:
    """The system's headless Chromium, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed; `make browser` installs it (apt-get, as root)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def book_pages() -> list[str]:
    """Every HTML page the book should have, relative to _build/html, in reading order: the
    English edition, then the Chinese one."""
    pages = [p.relative_to(ROOT).with_suffix(".html").as_posix() for p in toc_files()]
    english = pages + GENERATED_PAGES
    return english + [ZH + page for page in english]


def counterpart(page_path: str) -> str:
    """The same page in the other edition."""
    return page_path[len(ZH):] if page_path.startswith(ZH) else ZH + page_path


def built_pages(html: Path) -> list[str]:
    skip = {"_static", "_sources", "_images"}
    found = (p.relative_to(html) for p in html.rglob("*.html"))
    return sorted(p.as_posix() for p in found if not skip & set(p.parts))


# ---------------------------------------------------------------------------------------------
# Checking one page

# Runs in the page once it has loaded. MathJax 3 is awaited first when the page loads it.
FACTS_JS = r"""
async () => {
  const settle = (promise) => Promise.race([
    promise.then(() => true, () => false),
    new Promise((resolve) => setTimeout(() => resolve(false), 20000)),
  ]);
  let mathjaxSettled = true;
  if (window.MathJax && MathJax.version && MathJax.startup && MathJax.startup.promise) {
    mathjaxSettled = await settle(MathJax.startup.promise);
    if (mathjaxSettled && MathJax.Hub && MathJax.Hub.promise) {
      // Widget labels queued through book/_assets/mathjax-v2-shim.js.
      mathjaxSettled = await settle(MathJax.Hub.promise);
    }
  }
  const imgs = Array.from(document.images);
  for (const img of imgs) img.loading = "eager";
  await settle(Promise.all(imgs.map((img) => img.complete ? null : new Promise((done) => {
    img.addEventListener("load", done); img.addEventListener("error", done);
  }))));
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  // Text a reader sees, outside code, that still holds TeX delimiters.
  const rawTex = [];
  const skip = "pre, code, script, style, textarea, mjx-container, mjx-assistive-mml";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!el || el.closest(skip) || !visible(el)) continue;
    if (/\\\(|\\\)|\\\[|\\\]|\$\$/.test(node.data)) rawTex.push(node.data.trim().slice(0, 80));
  }
  const maths = Array.from(document.querySelectorAll(".math"));
  const views = Array.from(
    document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]'));
  return {
    mathjaxSettled,
    rawTex,
    mathCount: maths.length,
    mathUntypeset: maths.filter((m) => !m.querySelector("mjx-container"))
                        .map((m) => m.textContent.trim().slice(0, 80)),
    mjxCount: document.querySelectorAll("mjx-container").length,
    images: imgs.map((img) => ({src: img.currentSrc || img.src, width: img.naturalWidth})),
    widgetStates: Array.from(document.querySelectorAll(
        'script[type="application/vnd.jupyter.widget-state+json"]')).map((s) => s.textContent),
    widgetViews: views.map((s) => {
      const area = s.previousElementSibling;
      const rendered = !!area && area.classList.contains("widget-subarea");
      return {
        model: JSON.parse(s.textContent).model_id,
        rendered: rendered && area.childElementCount > 0 && visible(area),
        text: rendered ? area.innerText : "",
        math: rendered ? area.querySelectorAll("mjx-container").length : 0,
      };
    }),
    readouts: Array.from(document.querySelectorAll(".widget-readout")).map((r) => r.innerText),
    links: Array.from(document.querySelectorAll("a[href]")).map((a) => a.href),
    editionLinks: Array.from(document.querySelectorAll("a.edition-switch"))
                       .filter(visible).map((a) => ({href: a.href, text: a.innerText.trim()})),
    lang: document.documentElement.lang,
  };
}
"""

WIDGETS_RENDERED_JS = """
() => {
  const views = document.querySelectorAll(
    'script[type="application/vnd.jupyter.widget-view+json"]');
  return Array.from(views).every((s) => {
    const area = s.previousElementSibling;
    return area && area.classList.contains("widget-subarea") && area.childElementCount > 0;
  });
}
"""


# Chinese pages: find visible Chinese text, and draw a few of its characters, and two code points
# no font has (their .notdef glyph: tofu), large, in the same font stack.
CJK_PROBE_JS = r"""
() => {
  const cjk = /[\u3400-\u9fff]/;
  const visible = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const els = Array.from(document.querySelectorAll(
      "article h1, article h2, article p, article li, .navbar-brand, a"));
  const el = els.find((e) => visible(e) && cjk.test(e.innerText || ""));
  if (!el) return null;
  el.setAttribute("data-cjk-probe", "");
  const chars = Array.from(new Set(el.innerText.match(/[\u3400-\u9fff]/g))).slice(0, 4);
  const font = getComputedStyle(el).fontFamily;
  const box = document.createElement("div");
  box.style.cssText = "position:fixed;left:0;top:0;z-index:2147483647;background:#fff;color:#000";
  [...chars, "\u0378", "\u0379"].forEach((ch, i) => {
    const span = document.createElement("span");
    span.id = `cjk-probe-${i}`;
    span.textContent = ch;
    // One per line, in a box of whole pixels: equal glyphs give equal screenshots.
    span.style.cssText = `font-family:${font};font-size:48px;line-height:64px;display:block;` +
                         "width:64px;height:64px;overflow:hidden;text-align:left";
    box.appendChild(span);
  });
  document.body.appendChild(box);
  return {text: el.innerText.trim().slice(0, 40), chars, font};
}
"""


def css_cjk_families(css: Path = EDITIONS_CSS) -> set[str]:
    """The quoted font families of the Chinese pages' stack."""
    block = re.search(r'html\[lang\|="zh"\]\s*\{(.*?)\}', css.read_text(), re.S)
    assert block, f"{css} has no html[lang|=\"zh\"] rule"
    return set(re.findall(r'"([^"]+)"', block.group(1)))


def glyph_images(page, count: int) -> list[bytes]:
    """Grey-level pixels of the probe spans cjk-probe-0 .. count-1."""
    import io

    from PIL import Image

    out = []
    for i in range(count):
        png = page.locator(f"#cjk-probe-{i}").screenshot()
        out.append(Image.open(io.BytesIO(png)).convert("L").tobytes())
    return out


def cjk_problems(page) -> list[str]:
    """Whether the page's Chinese text is drawn in a real CJK font rather than as tofu.

    Every character a font lacks is drawn as the same .notdef box, so: a few distinct characters
    of the page's Chinese text, drawn large in the text's own font stack, must each have ink,
    differ from one another, and differ from the box drawn for two code points no font has
    (U+0378, U+0379, which must match each other: the check can see tofu). Chromium also reports,
    through the DevTools protocol, the platform fonts that drew the text: one must be a CJK family
    of the stack in book/_ext/static/moe-lab-editions.css.
    """
    probe = page.evaluate(CJK_PROBE_JS)
    if probe is None:
        return ["no visible Chinese text on a Chinese page"]
    chars = probe["chars"]
    images = glyph_images(page, len(chars) + 2)
    glyphs, tofu = images[: len(chars)], images[len(chars):]
    problems = []
    if tofu[0] != tofu[1]:
        problems.append("the tofu reference (U+0378, U+0379) did not draw one box; check invalid")
    ink = [sum(1 for v in img if v < 128) for img in glyphs]
    if len(chars) < 2:
        problems.append(f"too few Chinese characters to compare in {probe['text']!r}")
    if not all(ink):
        problems.append(f"Chinese characters drawn without ink: {chars} {ink}")
    if len(set(glyphs)) < len(glyphs) or any(g == tofu[0] for g in glyphs):
        problems.append(f"Chinese text {probe['text']!r} is drawn as tofu (identical boxes for "
                        f"{chars}) in font-family {probe['font']}")
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "[data-cjk-probe]"})
    fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node["nodeId"]})["fonts"]
    used = {f["familyName"] for f in fonts if f["glyphCount"]}
    if not used & css_cjk_families():
        problems.append(f"Chinese text {probe['text']!r} drawn in {sorted(used)}, none of the CJK "
                        f"fonts of {EDITIONS_CSS.name}: {sorted(css_cjk_families())}")
    return problems


@dataclass
class PageReport:
    page: str
    problems: list[str] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    responses: list[tuple[int, str]] = field(default_factory=list)


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname in LOCAL_HOSTS


@functools.cache
def anchors_of(path: Path) -> frozenset[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return frozenset(re.findall(r'\b(?:id|name)="([^"]+)"', text))


def redirect_target(path: Path) -> str | None:
    """The URL a page's `<meta http-equiv="refresh">` sends the reader to, if it has one."""
    text = path.read_text(encoding="utf-8", errors="replace")
    match = re.search(r'http-equiv="refresh"\s+content="\d+;\s*url=([^"]+)"', text, re.I)
    return match.group(1) if match else None


def link_problems(links: list[str], base_url: str, html: Path) -> list[str]:
    """Internal links whose page or anchor does not exist in the built book."""
    problems = []
    for link in sorted(set(links)):
        if not link.startswith(base_url):
            continue  # another host: not followed, and not requested by the page either
        parts = urlsplit(link)
        rel = unquote(parts.path)[len(urlsplit(base_url).path):]
        target = html / rel
        if rel == "" or rel.endswith("/"):
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"broken link: {link}")
        elif parts.fragment and target.suffix == ".html":
            if unquote(parts.fragment) not in anchors_of(target):
                problems.append(f"missing anchor: {link}")
    return problems


def widget_problems(facts: dict) -> list[str]:
    """Every saved widget view is rendered, and shows the state saved with it."""
    problems = []
    models: dict[str, dict] = {}
    for raw in facts["widgetStates"]:
        models.update(json.loads(raw).get("state", {}))
    views = facts["widgetViews"]
    if views and not models:
        problems.append("widget views on the page, but no saved widget state")
    for view in views:
        if not view["rendered"]:
            problems.append(f"widget {view['model']} not rendered")
        if "Error displaying widget" in view["text"]:
            problems.append(f"widget {view['model']}: {view['text'][:120]!r}")
    text = "\n".join(view["text"] for view in views)
    sliders = [
        m["state"] for m in models.values() if m.get("model_name", "").endswith("SliderModel")
    ]
    for readout in facts["readouts"]:
        try:
            shown = float(readout.replace(",", ""))
        except ValueError:
            continue  # ranges and selection sliders show text
        if not any(abs(shown - float(s.get("value", "nan"))) <= 0.5 * float(s.get("step") or 1)
                   for s in sliders if isinstance(s.get("value"), (int, float))):
            problems.append(f"slider readout {readout!r} matches no saved slider value")
    for model in models.values():
        if model.get("model_name") != "OutputModel":
            continue
        for out in model["state"].get("outputs", []):
            if out.get("output_type") == "stream":
                line = next((ln.strip() for ln in out["text"].splitlines() if ln.strip()), "")
                if line and line not in text:
                    problems.append(f"output widget does not show its saved text {line!r}")
    return problems


def check_page(browser, base_url: str, html: Path, page_path: str, shot: Path) -> PageReport:
    """Load one page and collect everything a reader would notice is wrong."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    report = PageReport(page_path)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    outside: list[str] = []

    def route(r):
        if is_local(r.request.url):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    allowed = [re.compile(pattern) for pattern, _reason in CONSOLE_ALLOW]
    console_errors: list[str] = []

    def on_console(msg):
        if msg.type == "error" and not any(a.search(msg.text) for a in allowed):
            console_errors.append(msg.text)

    page.on("console", on_console)
    page.on("pageerror", lambda err: console_errors.append(f"uncaught: {err}"))
    responses: list[tuple[int, str]] = []
    page.on("response", lambda resp: responses.append((resp.status, resp.url)))
    try:
        response = page.goto(base_url + page_path, wait_until="load")
        if response is None or not response.ok:
            report.problems.append(f"page did not load: {response and response.status}")
            return report
        target = redirect_target(html / page_path)
        shown = page_path  # the page the reader ends up on
        if target is not None:  # Jupyter Book's index.html only redirects to the first page
            page.wait_for_url(urljoin(base_url + page_path, target), timeout=WAIT_MS)
            page.wait_for_load_state("load")
            shown = urlsplit(page.url).path[len(urlsplit(base_url).path):]
        facts = page.evaluate(FACTS_JS)
        if facts["widgetViews"]:
            try:
                page.wait_for_function(WIDGETS_RENDERED_JS, timeout=WAIT_MS)
            except PlaywrightTimeout:
                pass  # reported below: the widgets that never rendered are listed
            facts = page.evaluate(FACTS_JS)
        report.facts = facts
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        if page_path.startswith(ZH):
            report.problems += cjk_problems(page)
    finally:
        context.close()

    report.problems += [f"console error: {e}" for e in console_errors]
    report.problems += [f"request left localhost: {u}" for u in outside]
    report.problems += [f"HTTP {status} {url}" for status, url in responses if status >= 400]
    report.responses = responses
    if not facts["mathjaxSettled"]:
        report.problems.append("MathJax did not finish typesetting within 20 s")
    report.problems += [f"raw TeX in visible text: {t!r}" for t in facts["rawTex"]]
    report.problems += [f"math not typeset: {m!r}" for m in facts["mathUntypeset"]]
    if facts["mathCount"] and not facts["mjxCount"]:
        report.problems.append("page has math but no MathJax output")
    report.problems += [f"image not loaded: {i['src']}" for i in facts["images"] if not i["width"]]
    report.problems += widget_problems(facts)
    report.problems += link_problems(facts["links"], base_url, html)
    report.problems += edition_problems(facts, base_url, shown)
    return report


def edition_problems(facts: dict, base_url: str, page_path: str) -> list[str]:
    """The page declares its language and links to its counterpart in the other edition."""
    chinese = page_path.startswith(ZH)
    problems = []
    if facts["lang"] != ("zh-CN" if chinese else "en"):
        problems.append(f"<html lang={facts['lang']!r}> on a {'Chinese' if chinese else 'English'}"
                        " page")
    want = base_url + counterpart(page_path)
    if not any(link["href"] == want for link in facts["editionLinks"]):
        problems.append(f"no visible link to the other edition's page {want}: "
                        f"{facts['editionLinks']}")
    return problems


# ---------------------------------------------------------------------------------------------
# The book


@pytest.fixture(scope="module")
def book_html(tmp_path_factory) -> Path:
    html = ROOT / "_build" / "html"
    if os.environ.get(REUSE_ENV) == "1":
        if not (html / "index.html").exists():
            pytest.fail(f"{REUSE_ENV}=1 but {html} holds no built book")
        return html
    # The chapters executed once for tests/test_chapters.py (in this session) are rendered as
    # they are, rather than executed a second time by the build.
    staged = stage_executed_book(tmp_path_factory.mktemp("executed_book"))
    return build_site(staged, execute="off")


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def site(book_html, browser):
    with serve(book_html) as base_url:
        yield browser, base_url, book_html


def test_every_built_page_is_checked(book_html):
    """No page of the build escapes the per-page checks below."""
    assert set(built_pages(book_html)) <= set(book_pages())


@pytest.mark.parametrize("page_path", book_pages())
def test_page(site, page_path):
    browser, base_url, html = site
    shot = SCREENSHOTS / Path(page_path).with_suffix(".png")
    report = check_page(browser, base_url, html, page_path, shot)
    assert not report.problems, f"{page_path}:\n  " + "\n  ".join(report.problems)


# ---------------------------------------------------------------------------------------------
# The offline machinery, on a one-page book

FIXTURE = r"""---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# 1. Fixture

Inline math $y = \sum_i g_i(x)\, E_i(x)$ and display math:

$$
\mathrm{FLOPs} \approx 6 N_\text{active} D
$$

```{code-cell} ipython3
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(3, 2))
ax.plot([0, 1, 2], [0, 1, 4])
ax.set_title("fixture figure")
plt.show()
```

```{code-cell} ipython3
import ipywidgets as widgets

alpha = widgets.FloatSlider(value=0.25, min=0, max=1, step=0.05, description=r"\(\alpha\)")
display(alpha)
display(widgets.Button(description="Route", icon="shuffle"))  # an icon: the bundle's own font
```

```{code-cell} ipython3
@widgets.interact(experts=(1, 64))
def show(experts=8):
    print(f"experts: {experts}")
```

```{code-cell} ipython3
from myst_nb import glue

glue("fixture_share", 12.345, display=False)
```

The share is {glue:text}`fixture_share:.1f`%.
"""


# The fixture page's Chinese catalog: the heading and the math paragraph translated.
FIXTURE_PO = r"""msgid ""
msgstr ""
"Content-Type: text/plain; charset=utf-8\n"

msgid "1. Fixture"
msgstr "1. 测试页：混合专家"

msgid "Inline math $y = \\sum_i g_i(x)\\, E_i(x)$ and display math:"
msgstr "行内公式 $y = \\sum_i g_i(x)\\, E_i(x)$ 与行间公式："

msgid "The share is {glue:text}`fixture_share:.1f`%."
msgstr "占比为 {glue:text}`fixture_share:.1f`%。"
"""


@pytest.fixture(scope="module")
def fixture_html(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("fixture_book")
    shutil.copy(ROOT / "_config.yml", src / "_config.yml")
    shutil.copytree(ROOT / "book" / "_assets", src / "book" / "_assets")
    shutil.copytree(ROOT / "book" / "_ext", src / "book" / "_ext")
    shutil.copy(ROOT / "book" / "references.bib", src / "book" / "references.bib")
    (src / "book" / "fixture.md").write_text(FIXTURE)
    (src / "_toc.yml").write_text("format: jb-book\nroot: book/fixture\n")
    catalogs = src / "locale" / "zh_CN" / "LC_MESSAGES" / "book"
    catalogs.mkdir(parents=True)
    (catalogs / "fixture.po").write_text(FIXTURE_PO, encoding="utf-8")
    # Built as `make book` builds: executed once for English, the Chinese page from the cache.
    # MPLBACKEND=Agg, as helpers' commands set it: book/_ext/inline_figures.py must still give
    # the page its figure.
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    try:
        return book_editions.build_site(src, execute="cache", quiet=True, env=env)
    except book_editions.BuildError as err:
        pytest.fail(f"fixture book build failed: {str(err)[-6000:]}")


def test_offline_math_figures_widgets(fixture_html, browser):
    """Math, a figure and widgets render from the book's own assets, with no CDN reachable."""
    with serve(fixture_html) as base_url:
        report = check_page(
            browser, base_url, fixture_html, "book/fixture.html", SCREENSHOTS / "_fixture.png"
        )
        zh = check_page(browser, base_url, fixture_html, ZH + "book/fixture.html",
                        SCREENSHOTS / "_fixture_zh.png")
    assert not report.problems, "\n".join(report.problems)
    assert not zh.problems, "\n".join(zh.problems)
    facts = report.facts
    # The checks above passed for the right reason: there was something to check.
    assert facts["mathCount"] >= 2 and facts["mjxCount"] >= 2
    assert len(facts["images"]) >= 1
    assert len(facts["widgetViews"]) == 3 and all(v["rendered"] for v in facts["widgetViews"])
    assert "Route" in facts["widgetViews"][1]["text"]
    assert "experts: 8" in facts["widgetViews"][2]["text"]
    assert sorted(float(r) for r in facts["readouts"]) == [0.25, 8.0]
    # The slider's TeX label was typeset through the MathJax 2 shim.
    assert facts["widgetViews"][0]["math"] >= 1
    fonts = [url for status, url in report.responses if status == 200 and ".woff" in url]
    assert any("/_static/vendor/html-manager/dist/" in url for url in fonts), fonts
    page_html = (fixture_html / "book" / "fixture.html").read_text()
    assert "cdn.jsdelivr" not in page_html and "cdnjs" not in page_html
    assert "_static/vendor/mathjax/es5/tex-chtml.js" in page_html
    assert "THEBE_JS_URL" not in page_html
    # The Chinese page: translated prose, the English build's outputs and widgets (reused from
    # its execution cache: book_editions fails the build if the Chinese one executed anything).
    zfacts = zh.facts
    assert zfacts["lang"] == "zh-CN" and zfacts["mathCount"] >= 2 and zfacts["mjxCount"] >= 2
    assert len(zfacts["images"]) >= 1
    assert len(zfacts["widgetViews"]) == 3 and all(v["rendered"] for v in zfacts["widgetViews"])
    assert "experts: 8" in zfacts["widgetViews"][2]["text"]
    zh_html = (fixture_html / ZH / "book" / "fixture.html").read_text(encoding="utf-8")
    assert "<h1>1. 测试页：混合专家" in zh_html and "行内公式" in zh_html  # numbered title too
    # A glued number inside a translated message (book/_ext/translated_glue.py).
    assert re.search(r"占比为 <span[^>]*>12\.3</span>%", zh_html), "translated glue missing"
    assert [link["text"] for link in zfacts["editionLinks"]] == ["English"]
    assert [link["text"] for link in facts["editionLinks"]] == ["中文"]
