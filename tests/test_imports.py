"""Who imports whom (README "Layout"), checked two ways for every module of npgpt and torchgpt:

- run: the module is imported in a fresh interpreter, and the modules it loaded are listed;
- read: the import statements of its source are listed, so a rule that a third-party library
  would hide (scipy loads argparse itself, torch loads tqdm itself) is still checked for our code.

npgpt needs only the base install (numpy, scipy, the standard library): nothing it loads comes
from anywhere else. torchgpt imports torch, numpy and npgpt's shared core, never the app.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What a fresh interpreter loads at start-up or what C extensions register under odd names: not imports of ours.
RUNTIME_NAMES = {"_cython_3_2_4", "_cyutility", "cython_runtime", "__mp_main__", "__main__"}
NPGPT_MAY_LOAD = {"numpy", "scipy", "npgpt"}
# npgpt.fast may also load numba when it is installed (the train and test extras; without it the
# fast path runs on NumPy, which tests/test_numba_kernels.py checks with numba hidden).
NPGPT_FAST_MAY_LOAD = {"numba", "llvmlite"}


def npgpt_may_load(module: str) -> set[str]:
    fast = module == "npgpt.fast" or module.startswith("npgpt.fast.")
    return NPGPT_MAY_LOAD | NPGPT_FAST_MAY_LOAD if fast else NPGPT_MAY_LOAD
NPGPT_NEVER_LOADS = ("torch", "tqdm", "matplotlib", "torchgpt", "gptapp")
NPGPT_NEVER_IMPORTS = ("argparse", "torch", "tqdm", "matplotlib", "torchgpt", "gptapp")
TORCHGPT_NEVER_LOADS = ("matplotlib", "tqdm", "gptapp")
TORCHGPT_MAY_IMPORT = {"torch", "numpy", "npgpt.config", "npgpt.sampling", "npgpt.data", "torchgpt"}


def modules_of(package: str) -> list[str]:
    """Every module of a package, found from its files (importing it to find them would spoil the check)."""
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


PROBE = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    before = set(sys.modules)
    importlib.import_module(name)
    loaded[name] = sorted(set(sys.modules) - before)
print(json.dumps(loaded))
"""


def loaded_each(*names: str, cwd: Path = ROOT) -> dict[str, set[str]]:
    """{name: the modules that importing it loaded}, importing `names` in turn in one fresh interpreter.

    A module that an earlier one imported already loads nothing new itself; what it loads is then
    counted under the earlier one, so the union over all names is what they load together.
    """
    out = subprocess.run([sys.executable, "-c", PROBE, *names], cwd=cwd, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"importing {names} failed:\n{out.stderr}"
    return {k: set(v) for k, v in json.loads(out.stdout.splitlines()[-1]).items()}


def loaded_by(*names: str, cwd: Path = ROOT) -> set[str]:
    """The modules that importing `names` loads in a fresh interpreter."""
    return set().union(*loaded_each(*names, cwd=cwd).values())


def top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def imports_in_source(module: str) -> set[str]:
    """The absolute names every import statement of the module's file names (relative ones resolved)."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return imports_in_file(path, module if path.name == "__init__.py" else module.rpartition(".")[0])


def imports_in_file(path: Path, package: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
    return names


def test_every_package_module_is_found():
    """The premise of the tests below: they see npgpt's and torchgpt's modules, the fast path included."""
    assert {"npgpt", "npgpt.layers", "npgpt.model", "npgpt.data", "npgpt.fast"} <= set(modules_of("npgpt"))
    assert {"torchgpt", "torchgpt.model", "torchgpt.runtime"} <= set(modules_of("torchgpt"))


@pytest.fixture(scope="module")
def npgpt_loads() -> dict[str, set[str]]:
    return loaded_each(*modules_of("npgpt"))


@pytest.fixture(scope="module")
def torchgpt_loads() -> dict[str, set[str]]:
    return loaded_each("torch", "numpy", *modules_of("torchgpt"))


@pytest.mark.parametrize("module", modules_of("npgpt"))
def test_npgpt_loads_only_the_base_install(module, npgpt_loads):
    """numpy, scipy and the standard library: `pip install -e .` (no extras) is enough for npgpt."""
    loaded = top_level(npgpt_loads[module]) - RUNTIME_NAMES
    forbidden = sorted(set(NPGPT_NEVER_LOADS) & loaded)
    assert not forbidden, f"importing {module} loads {forbidden}"
    outside = sorted(loaded - npgpt_may_load(module) - set(sys.stdlib_module_names) - {m for m in loaded if m.startswith("_sysconfigdata")})
    assert not outside, f"importing {module} loads {outside}, which the base install (numpy, scipy) lacks"


@pytest.mark.parametrize("module", modules_of("npgpt"))
def test_npgpt_source_imports_numpy_scipy_stdlib_only(module):
    names = imports_in_source(module)
    tops = top_level(names)
    forbidden = sorted(n for n in names if n.split(".")[0] in NPGPT_NEVER_IMPORTS)
    assert not forbidden, f"{module} imports {forbidden}"
    outside = sorted(tops - npgpt_may_load(module) - set(sys.stdlib_module_names))
    assert not outside, f"{module} imports {outside}"


@pytest.mark.parametrize("module", modules_of("torchgpt"))
def test_torchgpt_never_loads_the_app_or_plotting(module, torchgpt_loads):
    """Beyond what `import torch, numpy` loads by itself (torch.hub loads tqdm when it is installed)."""
    extra = top_level(torchgpt_loads[module])
    forbidden = sorted(set(TORCHGPT_NEVER_LOADS) & extra)
    assert not forbidden, f"importing {module} loads {forbidden} (beyond what torch itself loads)"


@pytest.mark.parametrize("module", modules_of("torchgpt"))
def test_torchgpt_source_imports_torch_numpy_and_npgpt_core(module):
    names = imports_in_source(module)
    ours_or_third_party = {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}
    allowed = {n for n in ours_or_third_party
               if any(n == a or n.startswith(a + ".") for a in TORCHGPT_MAY_IMPORT)}
    assert ours_or_third_party == allowed, f"{module} imports {sorted(ours_or_third_party - allowed)}"


def test_the_app_loads_no_torch_for_the_numpy_backend():
    """train_np.py without a .pt checkpoint: the app and the NumPy backend never load torch."""
    loaded = top_level(loaded_by("gptapp", "gptapp.cli", "gptapp.loop", "gptapp.data", "gptapp.run_log",
                                 "gptapp.checkpoint", "gptapp.backends.numpy"))
    assert "torch" not in loaded and "torchgpt" not in loaded, sorted(loaded)


def test_the_checks_fail_on_a_broken_rule(tmp_path):
    """A module that imports argparse and tqdm is caught by both checks: the checks can fail."""
    fake = tmp_path / "fakepkg"
    fake.mkdir()
    (fake / "__init__.py").write_text("import argparse\nfrom tqdm import tqdm\n", encoding="utf-8")
    assert "tqdm" in top_level(loaded_by("fakepkg", cwd=tmp_path))
    assert {"argparse", "tqdm"} <= imports_in_file(fake / "__init__.py", "fakepkg")
