"""Whatever a user types, the scripts answer like this (issue 10): random argument lists for the
`train` and `sample` commands of both scripts, with valid and invalid values of every flag, random
prompts, used and fresh output directories and damaged checkpoint files, each run as its command
line through the script's main() in this process, in a working directory and environment of its own
(an uncaught exception, which a real process would print as a traceback, fails the example; the
real process is tests/test_cli_errors.py's and tests/test_train_np.py's):

    - the exit status is 0 or 2 (bad input), never 1 (a fault) or a crash;
    - stderr holds at most one line starting "error:" (exactly one when the status is 2), and never
      "Traceback";
    - every checkpoint and metrics.jsonl that existed before is byte-identical afterwards, unless
      the command was a successful --resume or --overwrite of that directory; a run that moves an
      earlier one aside (--move_aside) keeps its bytes in a file of the same name.

Runs stay cheap: the tiny or bigram preset (or none: it fails earlier), --max_iters 0-2, small models.
Examples are derandomized, so every run of the suite draws the same ones; raise the count with
NPGPT_CLI_EXAMPLES=<factor> to hunt (e.g. 20 runs twenty times as many).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from train_helpers import DATA, SCRIPTS, load_script, working_directory

try:
    from gptapp.checkpoint import Checkpoint, load_npz, save_npz
except ImportError:
    from npgpt.checkpoint import Checkpoint, load_npz, save_npz

FACTOR = max(1, int(os.environ.get("NPGPT_CLI_EXAMPLES", "1")))


def budget(n: int):
    """n examples (times NPGPT_CLI_EXAMPLES); no shrinking: each step of it would be another run of a
    script, and a failing argument list reads well as it is."""
    return settings(max_examples=n * FACTOR, deadline=timedelta(seconds=120), derandomize=True, print_blob=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- the world of each example
#
# Every example runs in a fresh directory holding copies of these, named by "@name" placeholders in
# the argument lists (replaced by their paths just before the run):
#   @used_np, @used_torch     output directories of a finished 4-step tiny run of each script
#   @used_damaged             the np run with its ckpt_last.npz cut short
#   @fresh, @nested           directories that do not exist yet
#   @a_file                   a plain file (not a directory)
#   @good_np, @good_pt, @bigram_np            checkpoints (the last one of the bigram model)
#   @cut_npz, @cut_pt, @empty_npz, @text_npz, @noise_pt, @dup_vocab_npz, @nan_npz    damaged ones
#   @data, @small_text, @short_text, @no_newline, @latin1, @empty_text                  texts
#   @missing                  a path that does not exist; @dir: a directory

PLACES_DIRS = ("used_np", "used_torch", "used_damaged")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    if not DATA.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {DATA}")
    base = tmp_path_factory.mktemp("world")
    tiny = ["--preset", "tiny", "--data", str(DATA), "--max_iters", "4", "--eval_interval", "2",
            "--max_new_tokens", "5"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_script("np").main([*tiny, "--out_dir", str(base / "used_np")]) == 0
        assert load_script("torch").main([*tiny, "--out_dir", str(base / "used_torch"), "--device", "cpu"]) == 0
        assert load_script("np").main(["--preset", "bigram", "--data", str(DATA), "--max_iters", "2",
                                       "--eval_iters", "2", "--max_new_tokens", "5",
                                       "--out_dir", str(base / "bigram")]) == 0
    shutil.copytree(base / "used_np", base / "used_damaged")
    cut(base / "used_damaged" / "ckpt_last.npz")
    files = base / "files"
    files.mkdir()
    shutil.copy(base / "used_np" / "ckpt_best.npz", files / "good_np.npz")
    shutil.copy(base / "used_torch" / "ckpt_best.pt", files / "good_pt.pt")
    shutil.copy(base / "bigram" / "ckpt_last.npz", files / "bigram_np.npz")
    shutil.copy(files / "good_np.npz", files / "cut_npz.npz")
    cut(files / "cut_npz.npz")
    shutil.copy(files / "good_pt.pt", files / "cut_pt.pt")
    cut(files / "cut_pt.pt")
    (files / "empty_npz.npz").write_bytes(b"")
    (files / "text_npz.npz").write_text("First Citizen:\nSpeak, speak.\n")
    (files / "noise_pt.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    good = load_npz(files / "good_np.npz")
    bad = Checkpoint(**{**good.__dict__, "vocab": good.vocab[:-1] + good.vocab[0], "path": None})
    save_npz(files / "dup_vocab_npz.npz", bad)
    nan_params = {k: v.copy() for k, v in good.params.items()}
    next(iter(nan_params.values())).flat[0] = np.nan
    save_npz(files / "nan_npz.npz", Checkpoint(**{**good.__dict__, "params": nan_params, "path": None}))
    text = DATA.read_text(encoding="utf-8")
    (files / "data.txt").write_text(text, encoding="utf-8")
    (files / "small_text.txt").write_text(text[:30000], encoding="utf-8")
    (files / "short_text.txt").write_text("To be, or not", encoding="utf-8")
    (files / "no_newline.txt").write_text(text[:30000].replace("\n", " "), encoding="utf-8")
    (files / "latin1.txt").write_bytes("Ni\u00f1o, ni\u00f1a. ".encode("latin-1") * 200)
    (files / "empty_text.txt").write_text("")
    (files / "a_file").write_text("not a directory")
    (files / "dir").mkdir()
    shutil.rmtree(base / "bigram")
    return base


def cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def set_up(world: Path, work: Path) -> dict:
    """Copy the world into `work`; the {"@name": path} map of the placeholders."""
    places = {}
    for name in PLACES_DIRS:
        shutil.copytree(world / name, work / name)
        places[f"@{name}"] = work / name
    for f in (world / "files").iterdir():
        target = work / f.name
        if f.is_dir():
            target.mkdir()
        else:
            shutil.copy(f, target)
        places[f"@{f.stem}"] = target
    places["@fresh"] = work / "fresh"
    places["@nested"] = work / "a" / "b" / "out"
    places["@missing"] = work / "missing" / "nothing.npz"
    places["@data"] = work / "data.txt"
    return places


def run_files(work: Path) -> dict:
    """{path: bytes} of every checkpoint and metrics.jsonl under `work`."""
    return {p: p.read_bytes() for p in work.rglob("*")
            if p.is_file() and (p.suffix in (".npz", ".pt") or p.name == "metrics.jsonl")}


# --------------------------------------------------------------------------- strategies
#
# Each flag has valid values and invalid ones. An argument list takes each optional flag with a small
# probability, and at most one invalid value, so that most lists get past the flag checks and reach
# the data, the checkpoints and the run itself.

VOCAB_CHARS = "abcXYZ \n:!?'-"
ODD_CHARS = "\u00e9\u00fc\u4e2d\t\r~{}@\\"
prompts = st.text(alphabet=VOCAB_CHARS + ODD_CHARS, max_size=12)
TEXTS = (["@data", "@small_text"], ["@short_text", "@no_newline", "@latin1", "@empty_text", "@missing", "@dir"])
CKPTS = (["@good_np", "@good_pt", "@bigram_np"],
         ["@cut_npz", "@cut_pt", "@empty_npz", "@text_npz", "@noise_pt", "@dup_vocab_npz", "@nan_npz", "@missing",
          "@dir"])
SEEDS = (["0", "1337", "4294967295"], ["-1", "100000000000000000000000", "1e3", "x"])
SWITCH = None  # a flag without a value

TRAIN_FLAGS = {  # name: (valid values, invalid values); SWITCH for --resume and the like
    "data": TEXTS, "resume": SWITCH, "overwrite": SWITCH, "move_aside": SWITCH, "init_from": CKPTS,
    "vocab": (["@data"], ["@missing", "@empty_text"]), "progress": (["true", "false"], ["maybe"]),
    "n_layer": (["1", "2"], ["0", "x"]), "n_head": (["1", "2"], ["3", "0"]), "n_embd": (["16", "32"], ["33"]),
    "block_size": (["8", "16"], ["0"]), "dropout": (["0", "0.1"], ["1.5", "nan"]),
    "bias": (["true", "false"], ["maybe"]), "activation": (["relu", "gelu", "gelu_tanh"], ["swish"]),
    "tie_weights": (["true", "false"], ["2"]), "model": (["gpt", "bigram"], ["rnn"]),
    "batch_size": (["1", "4"], ["0"]), "learning_rate": (["1e-3", "1e-2", "0"], ["-1", "nan", "inf"]),
    "decay_lr": (["true", "false"], ["sometimes"]), "warmup_iters": (["0", "1", "2"], ["-3"]),
    "lr_decay_iters": (["0", "1", "2", "5"], ["-1"]), "min_lr": (["1e-4", "0"], ["-1"]),
    "beta1": (["0.9", "0"], ["1.0"]), "beta2": (["0.99"], ["-0.1"]), "weight_decay": (["0", "0.1"], ["-1"]),
    "grad_clip": (["0", "1.0"], ["-1"]), "eval_interval": (["1", "2"], ["0"]), "eval_iters": (["1", "2"], ["0"]),
    "log_interval": (["1", "5"], ["0"]), "seed": SEEDS, "temperature": (["0", "0.8"], ["-1", "inf", "nan"]),
    "top_k": (["0", "1", "5"], ["-1"]), "top_p": (["0.9", "1"], ["0", "1.5", "nan"]),
    "norm": (["layernorm", "rmsnorm"], ["batchnorm"]),
    "pos_emb": (["learned", "rope"], ["alibi"]), "qk_norm": (["true", "false"], ["x"]),
    "mlp_hidden": (["0", "24"], ["-1"]), "optimizer": (["adamw", "muon"], ["sgd"]),
    "gradient_accumulation_steps": (["1", "2"], ["0"]),
}
TORCH_TRAIN_FLAGS = {"dtype": (["auto", "float32"], ["float16"]), "compile": (["false"], ["maybe"]),
                     "attention": (["sdpa", "explicit"], ["flash"])}
SAMPLE_FLAGS = {
    "prompt_file": (["@small_text"], ["@missing", "@latin1"]), "num_samples": (["1", "2"], ["0", "x"]),
    "temperature": (["0", "0.8", "1e-9"], ["-1", "inf", "nan"]), "top_k": (["0", "1", "5"], ["-1"]),
    "top_p": (["0.9", "1"], ["0", "1.5", "nan"]), "seed": SEEDS,
    "vocab": (["@data"], ["@missing", "@empty_text", "@latin1"]), "data": (["@data"], ["@missing"]),
}


@st.composite
def flag_list(draw, table: dict, p: float = 0.15) -> list[list[str]]:
    """Some flags of `table`, each `--name [value]`; at most one of them with an invalid value."""
    chosen = [name for name in table if draw(st.integers(0, 99)) < 100 * p]
    wrong = draw(st.sampled_from([None] * 3 + chosen)) if chosen else None
    parts = []
    for name in chosen:
        values = table[name]
        if values is SWITCH:
            parts.append([f"--{name}"])
        else:
            parts.append([f"--{name}", draw(st.sampled_from(values[1] if name == wrong else values[0]))])
    return parts


@st.composite
def train_argv(draw, torch_flags: bool) -> list[str]:
    parts = draw(flag_list({**TRAIN_FLAGS, **(TORCH_TRAIN_FLAGS if torch_flags else {})}))
    parts += [
        draw(st.sampled_from([["--preset", "tiny"]] * 6 + [["--preset", "bigram"], ["--preset", "gigantic"], []])),
        # --max_iters and --max_new_tokens are always given, and small: without them a run takes minutes
        draw(st.sampled_from(["0", "1", "2"] * 3 + ["-1", "abc"]).map(lambda v: ["--max_iters", v])),
        draw(st.sampled_from(["0", "5", "20"] * 3 + ["-1"]).map(lambda v: ["--max_new_tokens", v])),
        draw(st.sampled_from(["@fresh"] * 3 + ["@used_np", "@used_torch", "@used_damaged", "@nested", "@a_file", ""])
             .map(lambda v: ["--out_dir", v])),
        draw(st.one_of(st.just([]), st.just([]), prompts.map(lambda p: ["--prompt", p]))),
        draw(st.sampled_from([[]] * 12 + [["--no_such_flag", "1"], ["stray"]])),
    ]
    if torch_flags:
        parts.append(draw(st.sampled_from([["--device", "cpu"]] * 8 + [["--device", "tpu"], ["--device", "cuda:7"]])))
    order = draw(st.permutations(range(len(parts))))
    command = draw(st.sampled_from([[], ["train"]]))
    return command + [a for i in order for a in parts[i]]


@st.composite
def sample_argv(draw, torch_flags: bool) -> list[str]:
    parts = draw(flag_list(SAMPLE_FLAGS, p=0.25))
    parts += [
        draw(st.sampled_from([[]] + [["--ckpt", c] for c in CKPTS[0] * 3 + CKPTS[1]])),
        draw(st.one_of(st.just([]), prompts.map(lambda p: ["--prompt", p]))),
        draw(st.sampled_from(["0", "5", "20"] * 3 + ["-1", "many"]).map(lambda v: ["--max_new_tokens", v])),
        draw(st.sampled_from([[]] * 12 + [["--no_such_flag", "1"], ["stray"]])),
    ]
    if torch_flags:
        parts.append(draw(st.sampled_from([["--device", "cpu"]] * 8 + [["--device", "tpu"]])))
    order = draw(st.permutations(range(len(parts))))
    return ["sample"] + [a for i in order for a in parts[i]]


# --------------------------------------------------------------------------- the property

@contextlib.contextmanager
def environment(changes: dict):
    """os.environ with `changes`, restored afterwards."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_in_process(backend: str, argv: list[str], cwd: Path, env: dict, command: str) -> tuple[int, str]:
    """(exit status, stderr) of the command through main(argv), in `cwd` with `env` added, as
    `sys.exit(main())` would end it; an exception escaping main() fails with the command."""
    out, err = io.StringIO(), io.StringIO()
    with environment(env), working_directory(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = load_script(backend).main(argv)
        except SystemExit as exc:
            rc = exc.code
        except Exception as exc:  # a real process would print its traceback
            raise AssertionError(f"{command}\nraised {exc!r} (a traceback)\nstderr:\n{err.getvalue()}") from exc
    if rc is None:
        rc = 0
    elif not isinstance(rc, int):  # sys.exit("text") prints the text and exits 1
        err.write(f"{rc}\n")
        rc = 1
    return rc, err.getvalue()


def check_command(world: Path, backend: str, template: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir=world) as tmp:
        work = Path(tmp)
        places = set_up(world, work)
        argv = [str(places.get(a, a)) for a in template]
        before = run_files(work)
        env = {"XDG_CACHE_HOME": str(work / "cache"), "NPGPT_DATA": str(work / "data.txt")}
        command = f"{SCRIPTS[backend]}.py {' '.join(map(repr, argv))}"
        returncode, stderr = run_in_process(backend, argv, work, env, command)
        shown = f"{command}\nexit {returncode}\nstderr:\n{stderr}"
        assert "Traceback" not in stderr, shown
        assert returncode in (0, 2), shown
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) <= 1, shown
        assert returncode == 0 or len(errors) == 1, shown
        after = run_files(work)
        ok = returncode == 0
        out_dir = (work / argv[argv.index("--out_dir") + 1]).resolve() if "--out_dir" in argv else None
        replaced = ok and out_dir is not None and ("--resume" in argv or "--overwrite" in argv)
        for path, data in before.items():
            if after.get(path) == data or (replaced and path.parent.resolve() == out_dir):
                continue
            moved = ok and "--move_aside" in argv and any(
                q.name == path.name and d == data for q, d in after.items() if q.resolve().is_relative_to(out_dir))  # noqa: E501
            assert moved, f"{path.relative_to(work)} changed or went missing\n{shown}"


@budget(20)
@given(template=train_argv(torch_flags=False))
@example(template=["--preset", "tiny", "--max_iters", "1", "--data", "@data", "--out_dir", "@used_np"])
@example(template=["--preset", "tiny", "--max_iters", "1", "--out_dir", "@fresh", "--seed", "-1"])
def test_train_np(world, template):
    check_command(world, "np", template)


@budget(20)
@given(template=sample_argv(torch_flags=False))
@example(template=["sample", "--ckpt", "@dup_vocab_npz", "--max_new_tokens", "5"])
def test_sample_np(world, template):
    check_command(world, "np", template)


@budget(10)
@given(template=train_argv(torch_flags=True))
@example(template=["--preset", "tiny", "--max_iters", "1", "--data", "@data", "--out_dir", "@used_torch",
                   "--device", "cpu"])
def test_train_torch(world, template):
    check_command(world, "torch", template)


@budget(10)
@given(template=sample_argv(torch_flags=True))
@example(template=["sample", "--ckpt", "@good_pt", "--seed", "-1", "--max_new_tokens", "5", "--device", "cpu"])
def test_sample_torch(world, template):
    check_command(world, "torch", template)
