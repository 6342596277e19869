"""The package map: old import paths of moved packages keep working with a DeprecationWarning
that names the new path, and give the very same objects; inside ``hypergrad/`` the imports
point one way (``unrolled`` uses ``reversible``, never the reverse)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from hypergradient._deprecation import MOVED

SRC = Path(__file__).resolve().parents[1] / "src" / "hypergradient"

# Run in a fresh interpreter: the first import of an old path is the one that warns.
_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    warnings.simplefilter("always")
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        import hypergradient as hg
    out["plain import warns"] = [str(w.message) for w in caught]
    for old, new in MOVED.items():
        with warnings.catch_warnings(record=True) as caught:
            exec(f"import hypergradient.{old} as module_old")  # the user's line: <string>
        import importlib
        module_new = importlib.import_module(f"hypergradient.{new}")
        out[old] = {
            "messages": [str(w.message) for w in caught if w.category is DeprecationWarning],
            "filenames": [w.filename for w in caught],
            "same_module": module_old is module_new,
            "attribute": getattr(hg, old) is module_new,
        }
    from hypergradient.optim.alias import adam
    from hypergradient.kfac.preconditioner import KFACPreconditioner
    from hypergradient.towers import SGD
    out["submodules"] = [
        adam is hg.diffopt.alias.adam,
        KFACPreconditioner is hg.optimizers.kfac.KFACPreconditioner,
        SGD is hg.optimizers.towers.SGD,
    ]
    print(json.dumps(out))
    """
).replace("MOVED", repr(MOVED))


def test_old_paths_import_with_a_warning_naming_the_new_path():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["plain import warns"] == []  # `import hypergradient` alone never warns
    for old, new in MOVED.items():
        got = out[old]
        (message,) = got["messages"]
        assert f"hypergradient.{old} has moved to hypergradient.{new}" in message
        assert f"import hypergradient.{new} instead" in message
        assert got["filenames"] == ["<string>"]  # points at the user's import line
        assert got["same_module"] and got["attribute"]
    assert out["submodules"] == [True, True, True]


def _relative_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_reversible_does_not_import_unrolled():
    hypergrad = SRC / "hypergrad"
    assert "unrolled" not in _relative_imports(hypergrad / "reversible.py")
    assert "reversible" in _relative_imports(hypergrad / "unrolled.py")
    assert _relative_imports(hypergrad / "_step.py") == set()


def test_no_package_keeps_a_folder_under_an_old_name_beyond_its_shim():
    for old in MOVED:
        folder = SRC / old
        assert sorted(p.name for p in folder.iterdir() if p.suffix == ".py") == ["__init__.py"]
