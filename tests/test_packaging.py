"""One installed package, `masklet`, and imports that follow the data flow.

`pip install .` must put everything under `masklet/` (a user's own `model.py` must not collide
with ours, in Ray workers neither), and code may import only from its own layer or lower ones:
monitoring < model < actors < pipeline < deploy. No import loops either.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"monitoring": 0, "model": 1, "actors": 2, "pipeline": 3, "deploy": 4}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import run at some point (inside functions too); imports
    under `if TYPE_CHECKING:` only serve annotations and are left out."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def _source_files():
    for top in LAYERS:
        yield from sorted((REPO / top).rglob("*.py"))


def test_imports_run_down_the_layers_and_never_by_top_level_names():
    problems = []
    for path in _source_files():
        own = LAYERS[path.relative_to(REPO).parts[0]]
        for line, module in _imports(path):
            first = module.split(".")[0]
            if first in LAYERS:
                problems.append(f"{path.relative_to(REPO)}:{line}: imports top-level {module!r}; use masklet.{module}")
            elif first == "masklet":
                target = module.split(".")[1] if "." in module else None
                if target not in LAYERS:
                    problems.append(f"{path.relative_to(REPO)}:{line}: imports {module!r}")
                elif LAYERS[target] > own:
                    problems.append(f"{path.relative_to(REPO)}:{line}: imports {module!r}, a layer above")
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for path in _source_files():
        name = "masklet." + ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for _, m in _imports(path) if m.startswith("masklet.") and m != name}
    modules = set(graph)
    graph = {m: {d for d in deps if d in modules} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_pip_install_gives_one_masklet_package_and_no_top_level_model(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(REPO)], check=True, cwd=tmp_path, timeout=600)
    wheel = next(wheels.glob("masklet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"masklet"}, tops
    for area in LAYERS:
        assert f"masklet/{area}/__init__.py" in names
    assert "masklet/deploy/console/index.html" in names and "masklet/monitoring/alerts.yaml" in names

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:  # a wheel is a zip laid out as site-packages: install = unpack
        zf.extractall(site)
    # The runtime dependencies come from the test venv, appended AFTER the fresh site-packages; its
    # editable-install hook is a .pth file, which Python only runs in site directories, not here.
    Path(site, "deps.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    check = ("import importlib.util, masklet.model, masklet.pipeline.engine, masklet.deploy.cli; "
             "assert importlib.util.find_spec('model') is None, 'top-level model'; "
             "assert importlib.util.find_spec('pipeline') is None, 'top-level pipeline'; "
             "print(masklet.model.__file__)")
    out = subprocess.run([str(python), "-c", check], check=True, capture_output=True, text=True, cwd=tmp_path,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.stdout.strip().startswith(site), out.stdout


def test_test_modules_have_unique_basenames():
    """pytest imports test modules by basename (no __init__.py under tests/): two files of one name in
    different folders stop the whole run at collection, as CI once did with two test_protocols.py."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(REPO)} and {path.relative_to(REPO)}")
        seen.setdefault(path.name, path)
    assert not clashes, "test modules sharing a basename: " + "; ".join(clashes)
