"""Open every page of the built book in headless Chromium and check what a reader sees.

Each page must load with no console error and no request leaving localhost, with its math
typeset by the self-hosted MathJax, every image loaded, every saved widget rendered, and every
internal link pointing at a page and anchor that exist. A screenshot of each page is saved under
_build/screenshots/.

By default the book is built from the current sources first, with `jupyter-book build . -W
--keep-going` as `make book` runs it, except that each chapter is the notebook already executed
once in this test session (tests/chapters.py: `executed`), so no chapter runs twice; set
MOE_LAB_REUSE_HTML=1 to check an existing, fresh _build/html (from `make book`) instead.
A second, one-page book built in a temporary folder from this file's FIXTURE page (math, a
matplotlib figure, widgets) checks the offline machinery itself, whatever the chapters contain.
Chromium comes from the system (`make browser` installs it).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

from tests.chapters import ROOT, stage_executed_book, toc_files

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
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
WAIT_MS = 30_000


# ---------------------------------------------------------------------------------------------
# Building and serving


def build_book(source: Path, timeout_s: int, **env_extra: str) -> Path:
    """Build the Jupyter Book in `source` as `make book` does, from scratch; return its HTML.

    `--all` and a fresh html folder: no page or environment left from an earlier build.
    """
    html = source / "_build" / "html"
    shutil.rmtree(html, ignore_errors=True)
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MPLBACKEND", None)  # as the Makefile does
    env.update(env_extra)
    proc = subprocess.run(
        [str(jupyter_book), "build", ".", "-W", "--keep-going", "--all"],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"book build failed (exit {proc.returncode}):\n{log}")
    return html


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
    """Every HTML page the book should have, relative to _build/html, in reading order."""
    pages = [p.relative_to(ROOT).with_suffix(".html").as_posix() for p in toc_files()]
    return pages + GENERATED_PAGES


def built_pages(html: Path) -> list[str]:
    skip = ("_static/", "_sources/", "_images/")
    found = (p.relative_to(html).as_posix() for p in html.rglob("*.html"))
    return sorted(p for p in found if not p.startswith(skip))


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
        if target is not None:  # Jupyter Book's index.html only redirects to the first page
            page.wait_for_url(urljoin(base_url + page_path, target), timeout=WAIT_MS)
            page.wait_for_load_state("load")
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
    return report


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
    return build_book(staged, timeout_s=15 * 60)


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

# Fixture

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
    # MPLBACKEND=Agg, as helpers' commands set it: book/_ext/inline_figures.py must still give
    # the page its figure.
    return build_book(src, timeout_s=5 * 60, MPLBACKEND="Agg")


def test_offline_math_figures_widgets(fixture_html, browser):
    """Math, a figure and widgets render from the book's own assets, with no CDN reachable."""
    with serve(fixture_html) as base_url:
        report = check_page(
            browser, base_url, fixture_html, "book/fixture.html", SCREENSHOTS / "_fixture.png"
        )
    assert not report.problems, "\n".join(report.problems)
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
