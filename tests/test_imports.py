"""Who imports whom (README "Layout"), checked two ways for every module of npgpt and torchgpt:

- run: the module is imported in a fresh interpreter, and the modules it loaded are listed;
- read: the import statements of its source are listed, so a rule that a third-party library
  would hide (scipy loads argparse itself, torch loads tqdm itself) is still checked for our code.

npgpt needs only the base install (numpy, scipy, the standard library): nothing it loads comes
from anywhere else. torchgpt imports torch, numpy and npgpt's shared core, never the app. The
exercises import npgpt, numpy and the standard library only: they load nothing beyond what npgpt
loads (scipy comes in through npgpt, never through an import of theirs), and never torch.
"""
from __future__ import annotations

import ast
import json
import os
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
# Packages that numpy, scipy and numba import by themselves when they happen to be installed (the
# test extra brings them in with transformers): optional imports of the base install, not needs of npgpt.
OPTIONAL_IMPORTS_OF_DEPENDENCIES = {
    "charset_normalizer",  # numpy.f2py (scipy.special loads it) reads Fortran files' encodings with it
    "yaml",                # numba.core.config reads a .numba_config.yaml with it
}


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
    assert {"exercises", "exercises.cli", "exercises.check", "exercises._worker"} <= set(modules_of("exercises"))


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
    outside = sorted(loaded - npgpt_may_load(module) - set(sys.stdlib_module_names) - OPTIONAL_IMPORTS_OF_DEPENDENCIES
                     - {m for m in loaded if m.startswith(("_sysconfigdata", "_cython_"))})
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
    """train_np.py without a .pt checkpoint: the script, the app and the NumPy backend never load torch
    (`make train` installs no torch)."""
    loaded = top_level(loaded_by("train_np", "gptapp", "gptapp.cli", "gptapp.loop", "gptapp.data",
                                 "gptapp.run_log", "gptapp.checkpoint", "gptapp.backends.numpy"))
    assert "torch" not in loaded and "torchgpt" not in loaded, sorted(loaded)


# --------------------------------------------------------------------------- the exercises

EXERCISES_MAY_IMPORT = {"numpy", "npgpt", "exercises"}


def test_the_exercises_load_only_what_npgpt_loads():
    """npgpt's modules (not its fast path) imported first, then every module of exercises/ in the
    same fresh interpreter: the exercises add only their own modules and the standard library's.
    What npgpt itself may load is test_npgpt_loads_only_the_base_install's to check."""
    npgpt = [m for m in modules_of("npgpt") if not (m == "npgpt.fast" or m.startswith("npgpt.fast."))]
    ours = modules_of("exercises")
    loads = loaded_each(*npgpt, *ours)
    added = top_level(set().union(*(loads[m] for m in ours))) - RUNTIME_NAMES
    assert "exercises" in added  # the premise: they were imported here, not before
    outside = sorted(added - {"exercises"} - set(sys.stdlib_module_names)
                     - {m for m in added if m.startswith("_sysconfigdata")})
    assert not outside, f"importing the exercises loads {outside} beyond what npgpt loads"


@pytest.mark.parametrize("module", modules_of("exercises"))
def test_exercises_source_imports_npgpt_numpy_stdlib_only(module):
    names = imports_in_source(module)
    outside = sorted(n for n in names if n.split(".")[0] not in EXERCISES_MAY_IMPORT | set(sys.stdlib_module_names))
    assert not outside, f"{module} imports {outside}"
    assert not any(n == "npgpt.fast" or n.startswith("npgpt.fast.") for n in names), f"{module} imports npgpt.fast"


# --------------------------------------------------------------------------- train_np.py without torch

# A sitecustomize that makes `import torch` fail as if torch were not installed (`make train`'s .venv).
HIDE_TORCH = """
import sys
class HideTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, HideTorch())
"""


def run_without_torch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python *args` at the project root in an interpreter whose `import torch` fails."""
    hook = tmp_path / "hide_torch"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HIDE_TORCH, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join([str(hook), str(ROOT)]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_hook_really_hides_torch(tmp_path):
    """Guards the test below: with the hook, `import torch` fails in that interpreter."""
    run = run_without_torch(tmp_path, "-c", "import torch")
    assert run.returncode != 0 and "ImportError: No module named 'torch'" in run.stderr, run.stderr


@pytest.mark.parametrize("case", ["sample --ckpt", "--init_from", "--resume"])
def test_train_np_asked_for_a_pt_without_torch_says_how_to_install_it(tmp_path, case):
    """One `error:` line naming the install command, exit 2, no traceback, nothing written."""
    torch = pytest.importorskip("torch")
    from gptapp.torch_checkpoint import save_torch_checkpoint
    from npgpt.config import GPTConfig
    from npgpt.model import init_params

    config = GPTConfig(vocab_size=3, block_size=4, n_layer=1, n_head=1, n_embd=4)
    payload = {"format": "npgpt-checkpoint", "version": 1, "backend": "torch", "model": "gpt",
               "gpt_config": config.to_dict(), "train_config": {}, "vocab": "abc",
               "model_state": {k: torch.from_numpy(v) for k, v in init_params(config, seed=0).items()},
               "optimizer": {}, "iter_num": 0, "best_val_loss": 2.5, "rng": {}}
    run_dir = tmp_path / "torch_run"
    run_dir.mkdir()
    ckpt = run_dir / "ckpt_last.pt"
    save_torch_checkpoint(ckpt, payload)
    text = tmp_path / "input.txt"
    text.write_text("abcabcabcab\n" * 200, encoding="utf-8")
    train = ["--preset", "tiny", "--data", str(text), "--max_iters", "2"]
    argv = {"sample --ckpt": ["sample", "--ckpt", str(ckpt), "--max_new_tokens", "3"],
            "--init_from": [*train, "--init_from", str(ckpt), "--out_dir", str(tmp_path / "out")],
            "--resume": [*train, "--resume", "--out_dir", str(run_dir)]}[case]
    before = sorted(p.name for p in run_dir.iterdir())
    run = run_without_torch(tmp_path, "train_np.py", *argv)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    print(run.stderr)
    assert "Traceback" not in run.stderr + run.stdout
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert 'pip install -e ".[torch]"' in lines[0] and "make train-torch" in lines[0], lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == before and not (tmp_path / "out").exists()


def test_the_checks_fail_on_a_broken_rule(tmp_path):
    """A module that imports argparse and tqdm is caught by both checks: the checks can fail."""
    fake = tmp_path / "fakepkg"
    fake.mkdir()
    (fake / "__init__.py").write_text("import argparse\nfrom tqdm import tqdm\n", encoding="utf-8")
    assert "tqdm" in top_level(loaded_by("fakepkg", cwd=tmp_path))
    assert {"argparse", "tqdm"} <= imports_in_file(fake / "__init__.py", "fakepkg")
