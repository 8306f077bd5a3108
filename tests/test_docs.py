# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The API reference covers the public surface, and public docstrings say what goes in and what comes out.

These checks read the ``.rst`` sources and the docstrings only (no Sphinx run), so they take well under a second; the
docs build itself (``make docs``, warnings as errors) and the examples (``make doctest``) run in their own targets.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import mpseg

API_DIR = Path(__file__).resolve().parents[1] / "docs" / "api"
DIRECTIVE = re.compile(r"^\.\. (auto\w+|py:\w+):: +(\S+)\s*$")
MEMBERS = re.compile(r"^\s+:members:(.*)$")
PUBLIC = [name for name in mpseg.__all__ if name != "__version__"]


def _resolve(dotted: str):
    """The object a directive names: import the longest importable module prefix, then walk attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _documented_objects() -> list:
    """Every object named by an autodoc directive in docs/api/*.rst, plus the members listed under an automodule."""
    found = []
    for page in sorted(API_DIR.glob("*.rst")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            match = DIRECTIVE.match(line)
            if not match:
                continue
            kind, target = match.groups()
            obj = _resolve(target)
            found.append(obj)
            if kind != "automodule":
                continue
            for option in lines[i + 1 :]:
                if not option.strip().startswith(":"):
                    break
                members = MEMBERS.match(option)
                if members:
                    listed = [m.strip() for m in members.group(1).split(",") if m.strip()]
                    found += [getattr(obj, m) for m in (listed or getattr(obj, "__all__", []))]
    return found


def test_resolver_finds_directives_and_members():
    # Guards the checks below against a parser that finds nothing (which would make them pass vacuously).
    documented = _documented_objects()
    assert mpseg.MaskedAttentionDecoder in documented
    assert any(obj is mpseg.convert.split_official for obj in documented)
    assert not any(obj is _resolve for obj in documented)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_in_api_reference(name):
    obj = getattr(mpseg, name)
    documented = _documented_objects()
    assert any(doc is obj for doc in documented), (
        f"mpseg.{name} appears in no autodoc directive in docs/api/*.rst (add `.. autofunction::`/`.. autoclass::`/"
        f"`.. autodata::`/`.. automodule::` for it)"
    )


def _public_callables():
    """(qualified name, object) for every public function and class, the members of public modules, and the
    ``forward`` of every public module class."""
    items = []
    for name in PUBLIC:
        obj = getattr(mpseg, name)
        if inspect.ismodule(obj):
            items += [(f"mpseg.{name}.{member}", getattr(obj, member)) for member in obj.__all__]
        elif inspect.isfunction(obj) or inspect.isclass(obj):
            items.append((f"mpseg.{name}", obj))
    for qualname, obj in list(items):
        if inspect.isclass(obj) and "forward" in vars(obj):
            items.append((f"{qualname}.forward", obj.forward))
    return items


def _parameters(func) -> list[str]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    return [p.name for p in signature.parameters.values() if p.name not in ("self", "cls")]


def _returns_something(func) -> bool:
    annotation = inspect.signature(func).return_annotation
    # A context manager written as a generator (`-> Iterator[None]`) hands nothing to its `with` block.
    nothing = (inspect.Signature.empty, None, "None", "Iterator[None]", "Generator[None, None, None]")
    return annotation not in nothing and str(annotation) not in ("typing.Iterator[None]",
                                                                 "collections.abc.Iterator[None]")


def _docstring_problems(qualname: str, obj) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        return [f"{qualname}: no docstring"]
    problems = []
    if inspect.isclass(obj):
        init = vars(obj).get("__init__")
        init_doc = (inspect.getdoc(init) or "") if init is not None else ""
        if init is not None and _parameters(init) and not any(
            section in text for text in (doc, init_doc) for section in ("Args:", "Attributes:")
        ):
            problems.append(f"{qualname}: constructor takes {_parameters(init)} but no Args/Attributes section")
        return problems
    if _parameters(obj) and "Args:" not in doc:
        problems.append(f"{qualname}: takes {_parameters(obj)} but its docstring has no Args section")
    if _returns_something(obj) and not any(section in doc for section in ("Returns:", "Yields:")):
        problems.append(f"{qualname}: returns a value but its docstring has no Returns section")
    return problems


def test_public_callables_found():
    names = [qualname for qualname, _ in _public_callables()]
    assert "mpseg.SetCriterion.forward" in names and "mpseg.convert.split_official" in names
    assert len(names) >= len(PUBLIC)


def test_docstring_checker_flags_missing_sections():
    # The checker must be able to fail: a function with arguments and a result but neither section is flagged.
    def undocumented(x: int) -> int:
        """Adds one."""
        return x + 1

    assert len(_docstring_problems("undocumented", undocumented)) == 2


@pytest.mark.parametrize("qualname, obj", _public_callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_docstring_has_sections(qualname, obj):
    problems = _docstring_problems(qualname, obj)
    assert not problems, "; ".join(problems)


@pytest.mark.slow
def test_readme_usage_snippet_runs():
    # The README's usage example is the first thing users copy: run it as written (random weights, CPU).
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no ```python block"
    namespace: dict = {}
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core CI machine two threads made this 4x slower.
    torch.set_num_threads(1)
    try:
        exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    finally:
        torch.set_num_threads(threads)
    assert namespace["semantic"].shape == (2, 64, 64)
    assert {"loss", "loss_ce_mp", "loss_mask_mp", "loss_dice_mp"} <= set(namespace["losses"])
    assert torch.isfinite(namespace["losses"]["loss"])
