"""The layer rule of ARCHITECTURE.md: a module imports only from its own layer or the layers below."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a package imports only from packages of the same or a lower rank
RANKS = {"kernels": 0, "layers": 1, "mixers": 2, "backbones": 3, "__init__": 3,
         "integrations": 4, "datasets": 4, "zoo": 4,
         "train": 5, "validate": 5, "cards": 5, "__main__": 5, "configs": 5, "bench": 6, "tests": 7}


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level metazoo package) of every import of a metazoo module in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    here = path.relative_to(ROOT).with_suffix("").parts
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(here[:-node.level]) if node.level <= len(here) else []
                mod = ".".join(["metazoo", *base, *([node.module] if node.module else [])])
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "metazoo" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def _sources() -> list[Path]:
    skip = {"build", "outputs", "multirun"}  # and hidden folders (.venv, .git, local scratch)
    return [p for p in ROOT.rglob("*.py")
            if not any(part in skip or part.startswith(".") for part in p.relative_to(ROOT).parts)]


def test_no_upward_imports():
    bad = []
    for path in _sources():
        pkg = _package(path)
        if pkg not in RANKS:
            bad.append(f"{path.relative_to(ROOT)}: package {pkg!r} has no layer in RANKS")
            continue
        for line, target in _imports(path):
            if target in RANKS and RANKS[target] > RANKS[pkg]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({pkg}) imports metazoo.{target}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a kernel importing a backbone is reported."""
    fake = ROOT / "kernels" / "_upward_probe.py"
    monkeypatch.setattr(sys.modules[__name__], "_sources", lambda: [fake])
    fake.write_text("from ..backbones import metaformer\n")
    try:
        with pytest.raises(AssertionError, match="imports metazoo.backbones"):
            test_no_upward_imports()
    finally:
        fake.unlink()


def test_import_metazoo_loads_models_only():
    """``import metazoo`` pays for the models, not the apps, the datasets or OpenMMLab."""
    code = ("import sys, metazoo\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[:2] in (['metazoo', 'train'], "
            "['metazoo', 'integrations'], ['metazoo', 'datasets']) or m.split('.')[0] in "
            "('mmengine', 'mmdet', 'mmseg', 'mmcv', 'hydra'))\n"
            "print(bad); assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert out.returncode == 0, out.stdout + out.stderr
