"""The package's shape: stages depend only on the components they are given and on `stages/state.py`, imports
sit at module level (function-local ones only for optional or heavy packages), and the wheel installs one
top-level package."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cosmos3_compiled"
# imported where first needed: optional extras (flash-attn-4, submitit, Triton) and inductor, which an eager
# run never loads
LAZY = {"flash_attn.cute", "submitit.helpers", "triton_kernels", "fp8_attention_kernel", "torch._inductor.config",
        "torch._inductor"}  # `from torch._inductor import inductor_prims`: registers a lowering when imported


def _imports(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """(node, module) of every import; relative ones as '.name' ('..name' one level up)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            if node.module is None:
                found += [(node, base + a.name) for a in node.names]
            else:
                found.append((node, base))
        elif isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names]
    return found


def _stage_modules() -> set[str]:
    return {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "state"}


def test_no_stage_imports_another():
    stages = _stage_modules()
    assert {"tokenize", "text_pass", "latents", "timesteps", "denoise", "decode", "postprocess", "save"} <= stages
    offenders = []
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        for node, module in _imports(ast.parse(path.read_text())):
            name = module.lstrip(".").removeprefix("cosmos3_compiled.stages.").removeprefix("stages.")
            relative_stage = module.startswith(".") and not module.startswith("..") and name in stages
            absolute_stage = module.startswith("cosmos3_compiled.stages.") and name in stages
            if relative_stage or absolute_stage:
                offenders.append(f"{path.name}:{node.lineno} imports {module}")
    assert not offenders, offenders


def test_the_import_check_sees_a_stage_import(tmp_path):
    """The check above on a made-up stage that imports another (so it cannot pass vacuously)."""
    tree = ast.parse("from .save import Save\nfrom cosmos3_compiled.stages.decode import Decode\nfrom .state import State\n")
    modules = [m for _, m in _imports(tree)]
    assert modules == [".save", "cosmos3_compiled.stages.decode", ".state"]


def test_imports_are_at_module_level():
    local = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node, module in _imports(fn):
                    if module.lstrip(".") not in LAZY:
                        local.append(f"{path.relative_to(ROOT)}:{node.lineno} {module}")
    assert not local, local


def test_wheel_installs_one_top_level_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {"cosmos3_compiled"}
    on_disk = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in PACKAGE.rglob("__init__.py")}
    assert on_disk == set(packages)  # every subpackage shipped, nothing else
