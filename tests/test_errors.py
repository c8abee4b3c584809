"""The error tree drawn in exporter/errors.py's docstring is the real one, and every error
class of the package is in it: the drawing cannot drift from the code."""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys

import exporter
from exporter import errors
from exporter.errors import ExporterError

_LINE = re.compile(r"^(?P<indent>[│├└─ ]*)(?P<name>[A-Za-z]\w*)(?P<rest>.*)$")


def drawn() -> dict[str, tuple[str | None, bool, str | None]]:
    """Each class the docstring draws: its parent, whether it is marked [retry], and the
    module it says the class lives in ([aep.adhoc] -> exporter.aep.adhoc)."""
    doc = errors.__doc__ or ""
    tree = doc[doc.index("ExporterError\n") :].split("\n\n")[0].splitlines()
    out: dict[str, tuple[str | None, bool, str | None]] = {}
    path: list[str] = []
    for line in tree:
        match = _LINE.match(line)
        assert match is not None, f"not a line of the tree: {line!r}"
        depth, name, rest = len(match["indent"]) // 4, match["name"], match["rest"]
        assert name not in out, f"{name} is drawn twice"
        path[depth:] = [name]
        where = re.match(r"\s*\[([\w.]+)\]", rest)
        module = f"exporter.{where[1]}" if where else None
        out[name] = (path[depth - 1] if depth else None, rest.rstrip().endswith("[retry]"), module)
    return out


def every_module() -> None:
    for info in pkgutil.walk_packages(exporter.__path__, "exporter."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


def real() -> dict[str, type[ExporterError]]:
    every_module()
    found: dict[str, type[ExporterError]] = {}
    todo: list[type[ExporterError]] = [ExporterError]
    while todo:
        cls = todo.pop()
        assert cls.__name__ not in found, f"two error classes named {cls.__name__}"
        found[cls.__name__] = cls
        todo.extend(c for c in cls.__subclasses__() if c.__module__.startswith("exporter."))
    return found


def test_the_drawn_tree_is_the_class_tree() -> None:
    picture, classes = drawn(), real()
    assert sorted(picture) == sorted(classes)
    for name, (parent, retry, module) in picture.items():
        cls = classes[name]
        bases = [b.__name__ for b in cls.__bases__ if issubclass(b, ExporterError)]
        assert bases == ([parent] if parent else []), f"{name}'s parent"
        assert cls.retryable is retry, f"{name} is drawn {'with' if retry else 'without'} [retry]"
        assert cls.__module__ == (module or "exporter.errors"), f"where {name} lives"


def test_every_exception_class_of_the_package_is_under_exporter_error() -> None:
    every_module()
    outside = []
    for name, module in list(sys.modules.items()):
        if name != "exporter" and not name.startswith("exporter."):
            continue
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not issubclass(value, ExporterError)
            ):
                outside.append(f"{name}.{value.__qualname__}")
    assert outside == []
