"""The README's and the docs' code blocks that are marked as examples still run.

The convention (README.md and every docs/**/*.md): an HTML comment on the line immediately
before a code fence marks the block as an example; unmarked blocks are not run.

    <!-- example -->             a ```python block: runs as-is in a fresh Python
                                 (`sys.executable`), cwd = the repository root; exit 0.
    <!-- example: EXTRA -->      a ```bash block: each command line runs through its own
                                 `bash -c` with " EXTRA" appended, cwd = the repository root
                                 (so `cd` and `export` do not carry over); each exits 0.
    <!-- example slow -->        as above, marked `slow` (more than about 30 s): runs with
    <!-- example slow: EXTRA --> `bash test.sh -m slow` (and in .ci/run), not by default.

For bash blocks, blank lines and `#` comment lines are skipped, a line ending in `\\` joins
the next one, and a trailing `# comment` is dropped before EXTRA is appended. `{tmp}` in
EXTRA or in a command is replaced by a fresh temporary directory, one per block (so a
block's commands can share files: `run.out_dir={tmp}/run` then `--checkpoint
{tmp}/run/checkpoints`); `{n}` by the command's number in its block (1, 2, ...), for the
blocks whose commands must not share an output directory (`run.out_dir={tmp}/run{n}`).
EXTRA is how a page keeps its command readable while the test makes it small:
`<!-- example: meta.outer_steps=2 run.out_dir={tmp}/run -->`. `<!-- example -->` before a
bash block runs its commands unchanged. The commands see PATH with this Python's
bin directory first (so `lopt` and `python` are the project's), WANDB_MODE=offline.

A marker that is not immediately followed by a python or bash fence, or that does not parse,
fails `test_example_markers_are_well_formed`: an example cannot silently stop running.
Each block is one test case, id `FILE:LINE` (the fence's line). The README also stays short
(at most 250 lines) and shows at least one runnable Python example.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
TIMEOUT_S = 180  # an example over ~30 s belongs under `<!-- example slow ... -->`
SLOW_TIMEOUT_S = 1800

_MARKER_START = re.compile(r"<!--\s*example\b")
_MARKER = re.compile(r"^<!--\s*example(?P<slow>\s+slow)?\s*(?::(?P<extra>.*?))?\s*-->$")
_INLINE_CODE = re.compile(r"(`+).*?\1")  # `<!-- example -->` quoted in prose is not a marker
_FENCE = re.compile(r"^(?P<ticks>`{3,})\s*(?P<lang>[\w+-]*)\s*$")
_LANGS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}


@dataclasses.dataclass(frozen=True)
class Example:
    """One marked code block."""

    file: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str  # "python" or "bash"
    code: str  # the block's text, common indentation removed
    extra: str | None  # bash only: appended to every command ("" or None: nothing)
    slow: bool

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def collect(text: str, file: str = "<string>") -> tuple[list[Example], list[str]]:
    """The marked examples of one Markdown text, and the problems of malformed markers."""
    lines = text.splitlines()
    examples: list[Example] = []
    problems: list[str] = []
    fence_open = ""  # the ticks of the code block being skipped, if any
    for i, raw in enumerate(lines):
        line = raw.strip()
        if fence_open:  # markers shown inside a code block are text, not markers
            if line.startswith(fence_open) and not line.strip("`"):
                fence_open = ""
            continue
        opening = _FENCE.match(line)
        if opening:
            fence_open = opening["ticks"]
            continue
        if not _MARKER_START.search(_INLINE_CODE.sub("", line)):
            continue
        where = f"{file}:{i + 1}"
        m = _MARKER.match(line)
        if m is None:
            problems.append(
                f"{where}: malformed example marker {line!r} (expected `<!-- example -->`, "
                "`<!-- example: EXTRA -->`, `<!-- example slow -->` or "
                "`<!-- example slow: EXTRA -->` alone on its line)"
            )
            continue
        fence = _FENCE.match(lines[i + 1].strip()) if i + 1 < len(lines) else None
        if fence is None:
            problems.append(f"{where}: example marker not immediately followed by a ``` fence")
            continue
        lang = _LANGS.get(fence["lang"].lower())
        if lang is None:
            problems.append(
                f"{where}: example fence has language {fence['lang']!r}; "
                f"expected one of {sorted(_LANGS)}"
            )
            continue
        extra = m["extra"].strip() if m["extra"] is not None else None
        if lang == "python" and extra is not None:
            problems.append(
                f"{where}: EXTRA ({extra!r}) is for bash blocks; a python block "
                "runs as-is (`<!-- example -->`)"
            )
            continue
        body, closed = [], False
        for j in range(i + 2, len(lines)):
            if lines[j].strip() == fence["ticks"]:
                closed = True
                break
            body.append(lines[j])
        if not closed:
            problems.append(f"{where}: the example's code fence is never closed")
            continue
        examples.append(
            Example(file, i + 2, lang, _dedent(body), extra, slow=m["slow"] is not None)
        )
    return examples, problems


def _dedent(body: list[str]) -> str:
    indents = [len(x) - len(x.lstrip()) for x in body if x.strip()]
    cut = min(indents, default=0)
    return "\n".join(x[cut:] for x in body) + "\n"


def _strip_comment(command: str) -> str:
    """`command` without a trailing `# comment` (a `#` outside quotes after whitespace)."""
    quote = None
    for k, ch in enumerate(command):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or command[k - 1].isspace()):
            return command[:k].rstrip()
    return command.rstrip()


def bash_commands(example: Example, tmp: str) -> list[str]:
    """The command lines of a bash example, EXTRA appended and `{tmp}` filled in."""
    joined: list[str] = []
    pending = ""
    for line in example.code.splitlines():
        if pending:
            line = pending + line.lstrip()
            pending = ""
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1].rstrip() + " "
            continue
        joined.append(line)
    if pending.strip():
        joined.append(pending)
    commands = []
    for line in joined:
        command = _strip_comment(line.strip())
        if not command:
            continue
        if example.extra:
            command = f"{command} {example.extra}"
        n = str(len(commands) + 1)
        commands.append(command.replace("{tmp}", tmp).replace("{n}", n))
    return commands


def example_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["WANDB_MODE"] = "offline"
    env.setdefault("WANDB_SILENT", "true")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_example(example: Example) -> list[tuple[str, subprocess.CompletedProcess]]:
    """Runs the example; returns (what ran, its process) for each step, stopping at a failure."""
    timeout = SLOW_TIMEOUT_S if example.slow else TIMEOUT_S
    env = example_env()
    tmp = tempfile.mkdtemp(prefix="docs-example-")
    done = []
    try:
        if example.lang == "python":
            script = Path(tmp) / "example.py"
            script.write_text(example.code)
            proc = subprocess.run(
                [sys.executable, str(script)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            return [(f"python block at {example.id}", proc)]
        for command in bash_commands(example, tmp):
            proc = subprocess.run(
                ["bash", "-c", command],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            done.append((command, proc))
            if proc.returncode != 0:
                break
        return done
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _collect_all() -> tuple[list[Example], list[str]]:
    examples, problems = [], []
    for path in markdown_files():
        if path.exists():
            got, bad = collect(path.read_text(), str(path.relative_to(ROOT)))
            examples += got
            problems += bad
    return examples, problems


EXAMPLES, PROBLEMS = _collect_all()


@pytest.mark.parametrize(
    "example",
    [pytest.param(e, id=e.id, marks=[pytest.mark.slow] if e.slow else []) for e in EXAMPLES],
)
def test_example_runs(example: Example):
    steps = run_example(example)
    assert steps, f"{example.id}: the block has no command"
    what, proc = steps[-1]
    assert proc.returncode == 0, (
        f"{example.id}: `{what}` exited {proc.returncode}\n"
        f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"
    )


def test_example_markers_are_well_formed():
    assert not PROBLEMS, "\n".join(PROBLEMS)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES})"


def test_readme_has_a_python_example():
    found = [e for e in EXAMPLES if e.file == "README.md" and e.lang == "python"]
    assert found, "README.md has no `<!-- example -->` python block"


# The collector itself, on small texts: these fail if it stops seeing what it should.

GOOD = """\
# Page

<!-- example -->
```python
print("hi")
```

  <!-- example slow: run.out_dir={tmp}/r{n} -->
  ```bash
  # a comment
  lopt train --config a.toml \\
      meta.outer_steps=2   # trailing comment

  python -m evaluate --checkpoint {tmp}/r/checkpoints
  ```

```python
not_an_example()
```
"""


def test_collect_finds_marked_blocks_only():
    examples, problems = collect(GOOD, "page.md")
    assert problems == []
    assert [(e.id, e.lang, e.slow) for e in examples] == [
        ("page.md:4", "python", False),
        ("page.md:9", "bash", True),
    ]
    assert examples[0].code == 'print("hi")\n'
    assert examples[1].extra == "run.out_dir={tmp}/r{n}"
    assert bash_commands(examples[1], "/T") == [
        "lopt train --config a.toml meta.outer_steps=2 run.out_dir=/T/r1",
        "python -m evaluate --checkpoint /T/r/checkpoints run.out_dir=/T/r2",
    ]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<!-- example -->\n\n```python\nx = 1\n```\n", "not immediately followed"),
        ("<!-- example -->\nx = 1\n", "not immediately followed"),
        ("<!-- example -->\n", "not immediately followed"),
        ("<!-- example -->\n```python\nx = 1\n", "never closed"),
        ("<!-- example -->\n```toml\nx = 1\n```\n", "language 'toml'"),
        ("<!-- example slow EXTRA -->\n```bash\nls\n```\n", "malformed"),
        ("<!-- example: meta.outer_steps=2 -->\n```python\nx = 1\n```\n", "EXTRA"),
        ("text <!-- example --> more\n```python\nx = 1\n```\n", "malformed"),
    ],
)
def test_collect_reports_malformed_markers(text, problem):
    examples, problems = collect(text, "bad.md")
    assert examples == []
    assert len(problems) == 1 and problem in problems[0], problems


def test_strip_comment_keeps_quoted_hashes():
    assert _strip_comment("echo '#not' \"# no\" # yes") == "echo '#not' \"# no\""
    assert _strip_comment("a=b#c") == "a=b#c"


def test_a_failing_example_fails():
    ok = Example("x.md", 1, "bash", "true\necho {tmp} | grep -q docs-example-\n", "", False)
    assert [p.returncode for _, p in run_example(ok)] == [0, 0]
    bad = Example("x.md", 1, "bash", "true\nfalse\ntrue\n", None, False)
    assert [p.returncode for _, p in run_example(bad)] == [0, 1]  # stops at the failure
    py = Example("x.md", 1, "python", "import sys\nsys.exit(3)\n", None, False)
    assert run_example(py)[0][1].returncode == 3


def test_example_commands_see_the_project_python_and_offline_wandb():
    code = f'test "$(command -v python)" -ef {sys.executable}\ntest "$WANDB_MODE" = offline\n'
    steps = run_example(Example("x.md", 1, "bash", code, None, False))
    assert [p.returncode for _, p in steps] == [0, 0]


def test_markers_quoted_in_prose_or_code_are_not_markers():
    text = (
        "Mark a block with `<!-- example -->` before its fence.\n\n"
        "```markdown\n<!-- example -->\n```python\nx = 1\n```\n"
    )
    assert collect(text) == ([], [])
