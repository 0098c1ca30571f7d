"""The numerically sensitive tests under every OpenBLAS kernel family this CPU can run, with numba's
kernels compiled for this CPU and for a generic x86-64, on 1 and 2 threads.

    python tools/portability.py                          # the whole matrix (make test-portability)
    python tools/portability.py --list                   # the matrix, and which variants this machine runs
    python tools/portability.py --variant nehalem-generic-1     # one variant: family-numba-threads
    python tools/portability.py --variant haswell-host-2 --tests tests/test_optim.py   # a smaller selection

A bound in the tests holds on every machine only if it holds for every way of summing that a machine
may pick: OpenBLAS picks its kernels (Prescott: SSE3, ..., SkylakeX: AVX-512) by the CPU, and numba
compiles for the CPU it runs on. Each variant forces one choice: OPENBLAS_CORETYPE for OpenBLAS,
NUMBA_CPU_NAME=generic (no AVX) or the host's own CPU for numba, each numba target with its own
NUMBA_CACHE_DIR, and OMP/OPENBLAS threads. After the tests, the same process asks threadpoolctl which
kernels every loaded OpenBLAS used and numba which CPU it compiled for; a variant whose request was
not what ran counts as failed.

A family runs where the CPU has its instructions (/proc/cpuinfo flags) and where the OpenBLAS that
numpy and scipy ship holds its kernels: a build without them (Zen, Cooperlake in the wheels) falls
back to another family, and the variant is listed as not built and skipped, not run twice.
Prints a table (variant, what ran, whether that is what it asked for, passed, failed, skipped, seconds);
exits 1 on any failure or any variant not run as asked, 2 on a variant this machine cannot run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tests whose bounds depend on summation order, vector width and fused multiply-adds.
SENSITIVE = ["tests/test_layers.py", "tests/test_model.py", "tests/test_fastpath.py",
             "tests/test_numba_kernels.py", "tests/test_optim.py", "tests/test_bounds.py", "parity_tests",
             "tests/test_hf.py", "tests/test_exercises.py", "tests/test_exercise_mistakes.py"]
IGNORE = ["parity_tests/test_cuda.py"]
# Tests of how processes start (numba's thread pool, its disk cache, a switch read at import): each runs
# fresh interpreters with an environment of its own and checks no number the kernels compute; `make
# test` runs them. Here they would only add most of a variant's time (and, with a cold cache, compile
# the kernels again in every interpreter they start).
DESELECT = [f"tests/test_numba_kernels.py::{name}" for name in (
    "test_with_openmp_already_loaded_the_pool_is_numbas_workqueue",
    "test_a_second_process_loads_the_kernels_from_the_disk_cache",
    "test_thread_count_follows_omp_num_threads_unless_numba_num_threads_is_set",
    "test_the_thread_pool_starts_passive_without_leaving_the_setting_behind",
    "test_npgpt_numba_0_keeps_the_fast_path_on_numpy")]

# OpenBLAS's x86-64 families (its names, as OPENBLAS_CORETYPE takes them) and the /proc/cpuinfo flags
# their kernels execute, each family needing what the one before it needs (driver/others/dynamic.c
# picks them by the same instruction sets; the vendor decides only which one it picks by itself).
FAMILIES = {
    "Prescott": {"pni"},                                            # SSE3
    "Nehalem": {"ssse3", "sse4_1", "sse4_2"},
    "Sandybridge": {"avx"},
    "Haswell": {"avx2", "fma"},
    "Zen": {"avx2", "fma"},                                         # AMD's tuning of the AVX2 kernels
    "SkylakeX": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"},
    "Cooperlake": {"avx512_bf16"},
    "SapphireRapids": {"amx_tile", "amx_bf16", "avx512_fp16"},
}
CUMULATIVE = {"Zen": "Haswell", "SkylakeX": "Haswell", "Cooperlake": "SkylakeX", "SapphireRapids": "Cooperlake",
              "Haswell": "Sandybridge", "Sandybridge": "Nehalem", "Nehalem": "Prescott"}
# On x86-64 OpenBLAS builds Katmai as another name for Prescott and reports the first name it finds.
SAME_KERNELS = {"Prescott": {"Prescott", "Katmai"}}
DEFAULT = "default"  # no OPENBLAS_CORETYPE: the family OpenBLAS picks itself (the only one off x86-64)

# Each family once; the two oldest with numba compiled for a generic x86-64 (what their machines
# would run); 1 and 2 threads each several times.
MATRIX = [("Prescott", "generic", 2), ("Nehalem", "generic", 1), ("Sandybridge", "host", 2),
          ("Haswell", "host", 1), ("Zen", "host", 2), ("SkylakeX", "host", 1), ("Cooperlake", "host", 2),
          ("SapphireRapids", "host", 1)]
NON_X86_MATRIX = [(DEFAULT, "host", 1), (DEFAULT, "generic", 2)]


class UsageError(Exception):
    """A variant this machine cannot run, or a name that is none; one line naming the fix."""


@dataclass(frozen=True)
class Variant:
    family: str   # an OpenBLAS family, or DEFAULT
    numba: str    # "host" or "generic"
    threads: int

    @property
    def name(self) -> str:
        return f"{self.family.lower()}-{self.numba}-{self.threads}"


def parse_variant(text: str) -> Variant:
    """`family-numba-threads`, e.g. nehalem-generic-1 (any case)."""
    parts = text.strip().split("-")
    names = {f.lower(): f for f in [*FAMILIES, DEFAULT]}
    if len(parts) != 3 or parts[0].lower() not in names or parts[1] not in ("host", "generic") \
            or parts[2] not in ("1", "2", "3", "4"):
        raise UsageError(f"--variant {text!r}: expected FAMILY-NUMBA-THREADS with FAMILY one of "
                         f"{', '.join(n.lower() for n in [*FAMILIES, DEFAULT])}, NUMBA host or generic, "
                         "THREADS 1 to 4, e.g. nehalem-generic-1")
    return Variant(names[parts[0].lower()], parts[1], int(parts[2]))


# --------------------------------------------------------------------------- what this machine runs

def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first processor in /proc/cpuinfo's text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def executable_families(flags: set[str]) -> list[str]:
    """The families whose kernels these flags can execute, oldest first."""
    def runs(family: str) -> bool:
        return FAMILIES[family] <= flags and (family not in CUMULATIVE or runs(CUMULATIVE[family]))
    return [f for f in FAMILIES if runs(f)]


def host_flags() -> set[str]:
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return set()


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


PROBE = """
import json, sys
import numpy, scipy.linalg
from threadpoolctl import threadpool_info
print(json.dumps(sorted(i["architecture"] for i in threadpool_info() if i["internal_api"] == "openblas")))
"""


def families_in_build(families: list[str]) -> dict[str, list[str]]:
    """{family: the families numpy's and scipy's OpenBLAS report when asked for it}: a family the build
    lacks comes back as another one."""
    out = {}
    for family in families:
        env = {**os.environ, "OPENBLAS_CORETYPE": family, "OPENBLAS_VERBOSE": "0"}
        run = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise UsageError(f"cannot ask OpenBLAS which kernels it holds ({run.stderr.strip().splitlines()[-1:]}); "
                             'install the test extra: pip install -e ".[test]"')
        out[family] = sorted(set(json.loads(run.stdout.splitlines()[-1])))
    return out


def reported_as(family: str, reported: list[str]) -> bool:
    return bool(reported) and all(r in SAME_KERNELS.get(family, {family}) for r in reported)


def plan(requested: list[Variant] | None) -> tuple[list[Variant], list[tuple[Variant, str]]]:
    """(variants to run, [(variant, why it is skipped)]). A requested variant that cannot run: UsageError."""
    runnable = executable_families(host_flags()) if is_x86_64() else []
    matrix = [Variant(*row) for row in (MATRIX if runnable else NON_X86_MATRIX)]
    variants = requested or matrix
    asked = sorted({v.family for v in variants if v.family != DEFAULT and v.family in runnable})
    built = families_in_build(asked)
    run, skipped = [], []
    for v in variants:
        if v.family == DEFAULT:
            why = ""
        elif v.family not in runnable:
            why = (f"this CPU lacks {' '.join(sorted(FAMILIES[v.family]))}" if is_x86_64() and runnable
                   else "not an x86-64 CPU with /proc/cpuinfo")
        elif not reported_as(v.family, built[v.family]):
            why = f"not in this OpenBLAS build (asked for it, it runs {'/'.join(built[v.family])})"
        else:
            why = ""
        if why and requested:
            raise UsageError(f"variant {v.name} cannot run here: {why}; pick one of: "
                             f"{', '.join(x.name for x in plan(None)[0])}")
        (skipped.append((v, why)) if why else run.append(v))
    return run, skipped


# --------------------------------------------------------------------------- one variant

# Runs pytest in this process, then reports what ran: OpenBLAS's kernels and threads, numba's target.
INNER = """
import json, os, sys
import pytest
rc = pytest.main(sys.argv[2:])
import numpy, scipy.linalg
from threadpoolctl import threadpool_info
report = {"rc": int(rc), "openblas": [(i["architecture"], i["num_threads"]) for i in threadpool_info()
                                      if i["internal_api"] == "openblas"]}
try:
    from numba.core import registry
    from npgpt.fast import numba_kernels as K
    report["numba_cpu"] = registry.cpu_target.target_context.codegen().magic_tuple()[1]
    report["numba_cache"] = K.CACHE_DIR
except ImportError as err:
    report["numba_cpu"] = f"unavailable: {err}"
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(report, f)
sys.exit(rc)
"""


@dataclass
class Outcome:
    variant: Variant
    ran: str = ""
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    problems: tuple = ()
    failures: tuple = ()


def variant_env(v: Variant, cache: Path) -> dict[str, str]:
    env = {k: val for k, val in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_NUM_THREADS",
                        "NUMBA_CACHE_DIR")}
    threads = str(v.threads)
    env.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               NUMBA_CACHE_DIR=str(cache / f"numba-{v.numba}"), PYTHONUNBUFFERED="1")
    if v.family != DEFAULT:
        env["OPENBLAS_CORETYPE"] = v.family
    if v.numba == "generic":
        env["NUMBA_CPU_NAME"] = "generic"
    return env


def host_cpu_name() -> str:
    try:
        import llvmlite.binding as llvm
        return llvm.get_host_cpu_name()
    except ImportError:
        return "host"


def junit_counts(path: Path) -> tuple[int, int, int, list[str]]:
    """(passed, failed, skipped, ids of the failed) from pytest's --junitxml file."""
    passed = failed = skipped = 0
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            failed += 1
            failures.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        elif "skipped" in kinds:
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, failures


def check_report(v: Variant, report: dict, cache: str, host_cpu: str) -> list[str]:
    """What ran that the variant did not ask for (INNER's report): [] when all is as asked."""
    problems = []
    kernels = sorted({arch for arch, _ in report["openblas"]})
    threads = sorted({n for _, n in report["openblas"]})
    if not kernels:
        problems.append("no OpenBLAS was loaded")
    elif v.family != DEFAULT and not reported_as(v.family, kernels):
        problems.append(f"asked for {v.family} kernels, OpenBLAS ran {'/'.join(kernels)}")
    if kernels and threads != [v.threads]:
        problems.append(f"asked for {v.threads} OpenBLAS thread(s), it ran {threads}")
    want_cpu = "generic" if v.numba == "generic" else host_cpu
    if report["numba_cpu"] != want_cpu:
        problems.append(f"asked numba for {want_cpu}, it compiled for {report['numba_cpu']}")
    if report.get("numba_cache") not in (None, cache):
        problems.append(f"numba cached its kernels in {report['numba_cache']}, not {cache}")
    if report["rc"] not in (0, 1):  # 1: tests failed, counted from the junit file; else pytest could not run
        problems.append(f"pytest exit status {report['rc']}")
    return problems


def ran_text(v: Variant, report: dict) -> str:
    kernels = sorted({arch for arch, _ in report["openblas"]})
    blas = "/".join(kernels) or "no OpenBLAS"
    if v.family != DEFAULT and reported_as(v.family, kernels) and kernels != [v.family]:
        blas = f"{v.family} (says {blas})"
    return f"{blas}, numba {report['numba_cpu']}"


def run_variant(v: Variant, tests: list[str], cache: Path, pytest_args: list[str]) -> Outcome:
    workers = max(1, min(8, (os.cpu_count() or 1) // v.threads))
    with tempfile.TemporaryDirectory(prefix="portability-") as tmp:
        junit, report_path = Path(tmp) / "junit.xml", Path(tmp) / "report.json"
        args = [*tests, *(f"--ignore={p}" for p in IGNORE), *(f"--deselect={d}" for d in DESELECT), "-q", "-p", "no:cacheprovider",
                f"--junitxml={junit}", "-n", str(workers if workers > 1 else 0), *pytest_args]
        print(f"\n=== {v.name}: OPENBLAS_CORETYPE={v.family if v.family != DEFAULT else '(unset)'}, "
              f"numba for {v.numba}, {v.threads} thread(s), {workers} pytest worker(s)", flush=True)
        (cache / f"numba-{v.numba}").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", INNER, str(report_path), *args], cwd=ROOT,
                             env=variant_env(v, cache), timeout=3600)
        out = Outcome(v, seconds=time.perf_counter() - start)
        if junit.is_file():
            out.passed, out.failed, out.skipped, failures = junit_counts(junit)
            out.failures = tuple(failures)
        if not report_path.is_file():
            out.problems = (f"pytest ended without a report (exit status {run.returncode})",)
            return out
        report = json.loads(report_path.read_text(encoding="utf-8"))
        out.ran = ran_text(v, report)
        out.problems = tuple(check_report(v, report, str(cache / f"numba-{v.numba}"), host_cpu_name()))
        if report["rc"] == 1 and not out.failed:
            out.problems += ("pytest reported failures that the junit file does not hold",)
        return out


# --------------------------------------------------------------------------- the table

def table(outcomes: list[Outcome], skipped: list[tuple[Variant, str]]) -> str:
    rows = [("variant", "ran", "as asked", "passed", "failed", "skipped", "seconds")]
    rows += [(o.variant.name, o.ran, "no" if o.problems else "yes", str(o.passed), str(o.failed), str(o.skipped),
              f"{o.seconds:.0f}") for o in outcomes]
    rows += [(v.name, f"not run: {why}", "-", "-", "-", "-", "-") for v, why in skipped]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/portability.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], metavar="FAMILY-NUMBA-THREADS",
                   help="run this variant only (repeatable), e.g. nehalem-generic-1; default: the whole matrix")
    p.add_argument("--list", action="store_true", help="print the matrix and what this machine runs, then exit")
    p.add_argument("--tests", nargs="+", metavar="PATH", help="these tests instead of the sensitive subset")
    p.add_argument("--cache", default=str(ROOT / "build" / "portability"),
                   help="folder of the numba caches, one per target (default: build/portability)")
    p.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --), e.g. -- -x -k f64")
    args = p.parse_args(argv)
    try:
        requested = [parse_variant(v) for v in args.variant] or None
        run, skipped = plan(requested)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.list:
        for v in run:
            print(f"{v.name:<26} runs")
        for v, why in skipped:
            print(f"{v.name:<26} not run: {why}")
        return 0
    tests = args.tests or [t for t in SENSITIVE if (ROOT / t).exists()]
    outcomes = [run_variant(v, tests, Path(args.cache), args.pytest_args) for v in run]
    print("\nportability matrix:", " ".join(tests))
    print(table(outcomes, skipped))
    for o in outcomes:
        for line in [*o.problems, *o.failures]:
            print(f"  {o.variant.name}: {line}")
    failed = sum(o.failed for o in outcomes)
    not_as_asked = [o.variant.name for o in outcomes if o.problems]
    if not_as_asked:
        print(f"not run as asked: {', '.join(not_as_asked)}")
    print(f"{sum(o.passed for o in outcomes)} passed, {failed} failed")
    return 1 if failed or not_as_asked or not outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
