"""Griffe extension of the documentation build: checks the project names docstrings mention.

Loaded by mkdocstrings (mkdocs.yml, `extensions:`). Once the project's four packages (`lopt`,
`tasks`, `meta_train`, `evaluate`) are loaded, every docstring in them, private ones
included, is scanned for

- backticked dotted names that start with a package: `` `lopt.export.load_optax` ``,
  `` `meta_train.build.Run.fused_step()` ``;
- modules run as commands: `python -m evaluate.bench` (backticked or not).

Each must name an object (module, class, function, attribute) that exists in the source. A
name that does not (a renamed function, a module that moved) is logged as a warning through
griffe's logger, which mkdocstrings routes to MkDocs: `mkdocs build --strict` fails on it.
A name whose target the API reference shows (no `_`-prefixed part) also becomes a link to
it (`` [`name`][target] ``), which autorefs checks again at render time.

`lopt.NAME` is also the spelling of a config key (`lopt.step_schedule`: the [lopt] section's
options): such a name passes when NAME is a field of `meta_train.config.LOptConfig` or a
parameter of a learned optimizer's constructor or of a function in `lopt`.

Names inside fenced code blocks and doctest lines are checked but never rewritten.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

PACKAGES = ("lopt", "tasks", "meta_train", "evaluate")
_PKG = "|".join(PACKAGES)
# `pkg.a.b` or `pkg.a.b()` / `pkg.a.b(x=1)`; group 1 is the dotted name.
_TICKED = re.compile(rf"(?<![\[\w`])`((?:{_PKG})(?:\.[A-Za-z_]\w*)+)(\([^`]*\))?`(?!\])")
_COMMAND = re.compile(rf"python3? -m ((?:{_PKG})(?:\.[A-Za-z_]\w*)*)")

logger = griffe.get_logger("docs_crossrefs")


def _resolve(collection: Any, dotted: str) -> tuple[str, Any] | None:
    """Follows `dotted` through the loaded modules; returns (verdict, object) or None.

    verdict is "object" when every part resolved, "opaque" when an attribute part was reached
    with parts left (`Config.meta.outer_steps`: the rest is a value's field, not checked).
    """
    parts = dotted.split(".")
    try:
        obj = collection[parts[0]]
    except KeyError:
        return None
    for part in parts[1:]:
        if obj.is_alias:
            try:
                obj = obj.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return ("opaque", obj)  # imported from outside the project
        if part in obj.members:
            obj = obj.members[part]
        elif obj.is_attribute:
            return ("opaque", obj)
        else:
            return None
    if obj.is_alias:
        try:
            obj = obj.final_target
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return ("opaque", obj)
    return ("object", obj)


def _lopt_option_names(collection: Any) -> set[str]:
    """The names `lopt.NAME` may mean as a config key: LOptConfig fields and lopt parameters."""
    names: set[str] = set()
    try:
        names.update(collection["meta_train.config.LOptConfig"].members)
    except KeyError:
        pass

    def walk(obj: Any) -> None:
        for member in obj.members.values():
            if member.is_alias:
                continue
            if member.is_function:
                names.update(p.name for p in member.parameters)
            if member.is_class or member.is_module:
                walk(member)

    walk(collection["lopt"])
    return names


def _shown(obj: Any) -> bool:
    """Whether the API reference renders `obj` (mkdocs.yml: `filters: ["!^_"]`)."""
    path = obj.path
    if path.split(".")[0] not in PACKAGES:
        return False
    return not any(part.startswith("_") for part in path.split(".")[1:])


class CrossRefs(griffe.Extension):
    """Checks and links the project names that docstrings mention (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._loaded: set[str] = set()
        self._done = False

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._loaded.add(pkg.name)
        if self._done or not all(name in self._loaded for name in PACKAGES):
            return
        self._done = True
        collection = loader.modules_collection
        options = _lopt_option_names(collection)
        for name in PACKAGES:
            self._check_tree(collection[name], collection, options)

    def _check_tree(self, obj: Any, collection: Any, options: set[str]) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self._check_docstring(obj, collection, options)
        for member in obj.members.values():
            if not member.is_alias:
                self._check_tree(member, collection, options)

    def _check_docstring(self, obj: Any, collection: Any, options: set[str]) -> str:
        lines = obj.docstring.value.split("\n")
        fence = False
        out = []
        for i, line in enumerate(lines):
            where = f"{obj.relative_filepath}:{(obj.docstring.lineno or 0) + i}"
            stripped = line.lstrip()
            code = fence or stripped.startswith(("```", ">>>"))
            if stripped.startswith("```"):
                fence = not fence
            for m in _COMMAND.finditer(line):
                found = _resolve(collection, m.group(1))
                if found is None or not found[1].is_module:
                    logger.warning(f"{where}: `python -m {m.group(1)}`: no such module")

            def replace(m: re.Match, *, code: bool = code, where: str = where) -> str:
                dotted = m.group(1)
                found = _resolve(collection, dotted)
                if found is None:
                    parts = dotted.split(".")
                    if parts[0] == "lopt" and len(parts) == 2 and parts[1] in options:
                        return m.group(0)  # a config key of the [lopt] section
                    logger.warning(f"{where}: `{dotted}` names nothing in the source")
                    return m.group(0)
                verdict, target = found
                if code or verdict != "object" or not _shown(target):
                    return m.group(0)
                return f"[{m.group(0)}][{target.path}]"

            out.append(_TICKED.sub(replace, line))
        return "\n".join(out)
