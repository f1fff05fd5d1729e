"""The documentation site (mkdocs.yml): it builds strictly, and its API reference covers the code.

`mkdocs build --strict` fails on a broken link, anchor or image, on a docstring `Args:`
entry the signature lacks, and on a backticked project name in a docstring that names
nothing (scripts/docs_crossrefs.py). The build needs the `docs` extra
(`pip install -e '.[docs]'`); without it those tests are skipped (.ci/run installs it and
builds the site anyway).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lopt", "tasks", "meta_train", "evaluate")
HAVE_DOCS_EXTRA = all(
    importlib.util.find_spec(m) is not None for m in ("mkdocs", "mkdocstrings_handlers", "griffe")
)
needs_docs_extra = pytest.mark.skipif(
    not HAVE_DOCS_EXTRA, reason="the docs extra is not installed (pip install -e '.[docs]')"
)


def _modules() -> set[str]:
    found = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.add(".".join(parts))
    return found


def _directives() -> dict[str, str]:
    """`::: name` directives of docs/api/*.md: name -> page."""
    found = {}
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        for m in re.finditer(r"^::: *([\w.]+)", page.read_text(), re.M):
            found[m.group(1)] = page.name
    return found


def test_api_reference_documents_every_module():
    documented = _directives()
    # A package whose __init__ has no docstring has nothing to show of its own.
    empty_packages = {
        m
        for m in _modules()
        if (ROOT / m.replace(".", "/") / "__init__.py").exists()
        and not (ROOT / m.replace(".", "/") / "__init__.py").read_text().strip()
    }
    missing = sorted(_modules() - empty_packages - set(documented))
    assert not missing, f"modules with no `::: module` directive in docs/api/*.md: {missing}"
    stale = sorted(set(documented) - _modules())
    assert not stale, f"docs/api/*.md documents modules that do not exist: {stale}"


@needs_docs_extra
def test_mkdocs_build_is_strict_clean(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    problems = [x for x in proc.stderr.splitlines() if x.startswith(("WARNING", "ERROR"))]
    assert proc.returncode == 0, "\n".join(problems) or proc.stderr[-3000:]
    assert (tmp_path / "api" / "lopt" / "index.html").exists()


# scripts/docs_crossrefs.py on a small fake project: fails if it stops catching stale names.

FAKE = {
    "lopt/__init__.py": "",
    "lopt/base.py": '''
        """Base. See `lopt.base.make`, `meta_train.run.Runner.go()` and `lopt.base._hidden`.

        Config key `lopt.step_size` is an option; `lopt.base.gone` was renamed; so was
        `tasks.nothing`. Run `python -m meta_train.run`, not `python -m meta_train.walk`.

        ```python
        `lopt.base.make`
        ```
        """


        def make(step_size: float = 1.0):
            """Makes. `lopt.base.Thing.attr.deeper` is a value's field."""


        def _hidden():
            pass


        class Thing:
            attr: dict = {}
        ''',
    "tasks/__init__.py": "",
    "meta_train/__init__.py": "",
    "meta_train/run.py": '''
        """Runs."""


        class Runner:
            def go(self):
                """Goes. Not `meta_train.run.Runner.went`."""
        ''',
    "evaluate/__init__.py": "",
}


@needs_docs_extra
def test_crossrefs_extension_warns_on_names_that_do_not_exist(tmp_path, caplog):
    import griffe  # noqa: PLC0415 - only with the docs extra

    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    loader = griffe.GriffeLoader(
        extensions=griffe.load_extensions(str(ROOT / "scripts" / "docs_crossrefs.py")),
        search_paths=[str(tmp_path)],
        allow_inspection=False,
    )
    with caplog.at_level(logging.WARNING):
        for pkg in PACKAGES:
            loader.load(pkg, try_relative_path=False)
    warned = sorted(re.findall(r"`([^`]+)`(?: names nothing|: no such module)", caplog.text))
    assert warned == [
        "lopt.base.gone",
        "meta_train.run.Runner.went",
        "python -m meta_train.walk",
        "tasks.nothing",
    ], caplog.text
    doc = loader.modules_collection["lopt.base"].docstring.value
    # Shown names become links; private ones and those in code blocks stay as they were.
    assert "[`lopt.base.make`][lopt.base.make]" in doc
    assert "[`meta_train.run.Runner.go()`][meta_train.run.Runner.go]" in doc
    assert " `lopt.base._hidden`." in doc and "[`lopt.base._hidden`]" not in doc
    assert "\n`lopt.base.make`\n" in doc
    assert "[`lopt.step_size`]" not in doc


def _readme_links() -> list[tuple[int, str]]:
    """(line, target) of the README's relative Markdown links and images."""
    found = []
    for n, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        for m in re.finditer(r"\]\(([^)\s]+)\)", line):
            target = m.group(1)
            if not re.match(r"^[a-z]+:|^#", target):
                found.append((n, target))
    return found


def test_readme_links_point_to_files_that_exist():
    # mkdocs checks the docs' links; the README is outside docs/, so check it here.
    missing = [
        f"README.md:{n}: {t}" for n, t in _readme_links() if not (ROOT / t.split("#")[0]).exists()
    ]
    assert not missing, "\n".join(missing)


@needs_docs_extra
def test_readme_links_point_to_anchors_that_exist():
    import markdown  # noqa: PLC0415 - only with the docs extra

    ids: dict[str, set[str]] = {}
    broken = []
    for n, target in _readme_links():
        path, _, anchor = target.partition("#")
        if not anchor or not path.endswith(".md") or not (ROOT / path).exists():
            continue
        if path not in ids:
            md = markdown.Markdown(extensions=["toc", "attr_list", "tables", "fenced_code"])
            html = md.convert((ROOT / path).read_text())
            ids[path] = set(re.findall(r'id="([^"]+)"', html))
        if anchor not in ids[path]:
            broken.append(f"README.md:{n}: {target}")
    assert not broken, "\n".join(broken)
