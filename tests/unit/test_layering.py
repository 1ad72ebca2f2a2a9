"""The house's layering, checked by scanning every import (function-local ones too).

- ``crypto`` is a leaf: it imports nothing of fedface's core, ``server`` or ``client``.
- The core (``fedface``) imports no ``server`` or ``client`` module, except in its one
  composition root (``fedface/runner.py``) and the command line (``fedface/cli``).
- ``server`` and ``client`` never import each other: they meet only on the wire schema
  (``fedface/protocol.py``).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSITION = {"fedface/runner.py"}
CLI = "fedface/cli"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, at any depth of the file (line, dotted name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _violations(package: str, forbidden: tuple[str, ...], allowed=lambda rel: False) -> list[str]:
    bad = []
    for path in _files(package):
        rel = path.relative_to(ROOT).as_posix()
        if allowed(rel):
            continue
        for line, name in _imports(path):
            if name.split(".")[0] in forbidden:
                bad.append(f"{rel}:{line} imports {name}")
    return bad


def test_the_scan_sees_function_local_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from server.loop import run_federated\n    import client.app\n")
    assert [n for _, n in _imports(f)] == ["server.loop", "client.app"]


def test_crypto_is_a_leaf():
    assert _violations("crypto", ("fedface", "server", "client")) == []


def test_the_core_reaches_server_and_client_only_through_its_composition_root():
    allowed = lambda rel: rel in COMPOSITION or rel.startswith(CLI)  # noqa: E731
    assert _violations("fedface", ("server", "client"), allowed) == []


@pytest.mark.parametrize("side,other", [("server", "client"), ("client", "server")])
def test_server_and_client_meet_only_on_the_wire_schema(side, other):
    assert _violations(side, (other,)) == []
