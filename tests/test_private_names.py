"""Private names of other libraries are used only in the adapter modules.

Where Twisted, treq or botocore has no public API for what the daemon
needs, the private use lives in one small module that says why, with a test
that fails loudly when an upgrade breaks it (docs/decisions.md, D11).  This
test keeps it that way: it reads every module of the package and reports
private imports, private attributes the package does not define itself, and
``getattr``-style access to such names, outside the adapters.  (An attribute
the package also defines, such as ``._factory``, cannot be told apart by
name alone; the known ones are listed in ``KNOWN``.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import xraytwisted

PACKAGE = Path(xraytwisted.__file__).parent
ADAPTERS = frozenset(
    {
        "outbound/twisted_private.py",
        "outbound/treq_private.py",
        "aws/botocore_private.py",
    }
)
# Private names the code has used, by text (some are also names of ours).
KNOWN = re.compile(
    r"_sslverify|_HTTP11ClientFactory|_addCACertsToContext|_expiry_time|(?<!self)\._factory\s*="
)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_names(trees: list[ast.Module]) -> set[str]:
    """Every name the package defines: functions, classes, attributes, variables."""
    own: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
    return own


def _uses(tree: ast.Module, own: set[str]) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "__future__" or node.module.split(".")[0] == "xraytwisted":
                continue
            if any(_private(part) for part in node.module.split(".")):
                found.append((node.lineno, f"from {node.module} import ..."))
            found += [(node.lineno, f"imports {a.name}") for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(part) for part in alias.name.split(".")):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            found.append((node.lineno, f".{node.attr}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and node.args[1].value not in own
        ):
            found.append((node.lineno, f"{node.func.id}(..., {node.args[1].value!r})"))
    return found


class PrivateNamesTests(SynchronousTestCase):
    def test_only_the_adapters_use_private_names_of_other_libraries(self) -> None:
        sources = {
            path.relative_to(PACKAGE).as_posix(): path.read_text()
            for path in sorted(PACKAGE.rglob("*.py"))
        }
        trees = {name: ast.parse(text, name) for name, text in sources.items()}
        own = _own_names(list(trees.values()))
        problems = []
        for name, tree in trees.items():
            if name in ADAPTERS:
                continue
            problems += [f"{name}:{line}: {what}" for line, what in _uses(tree, own)]
            for number, line in enumerate(sources[name].splitlines(), 1):
                if KNOWN.search(line):
                    problems.append(f"{name}:{number}: {line.strip()}")
        self.assertEqual(
            problems,
            [],
            "private names of other libraries outside the adapter modules "
            f"({', '.join(sorted(ADAPTERS))}); move them there, with why",
        )

    def test_the_adapters_exist(self) -> None:
        for name in ADAPTERS:
            self.assertTrue((PACKAGE / name).is_file(), name)

    def test_the_check_finds_what_it_looks_for(self) -> None:
        tree = ast.parse(
            "from twisted.internet._sslverify import IOpenSSLTrustRoot\n"
            "from twisted.web.client import _HTTP11ClientFactory\n"
            "import twisted.internet._sslverify\n"
            "x = getattr(credentials, '_expiry_time', None)\n"
            "y = credentials._expiry_time\n"
            "z = self._ours\n"
        )
        self.assertEqual([line for line, _ in _uses(tree, {"_ours"})], [1, 2, 3, 4, 5])
