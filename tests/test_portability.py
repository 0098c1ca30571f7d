"""tools/portability.py's decisions, without running the matrix: which OpenBLAS families a CPU's flags
can execute, the matrix's coverage, the check that a variant ran as asked, and the counts it reads
from pytest's junit file. (`make test-portability` runs the matrix itself.)"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("portability", ROOT / "tools" / "portability.py")
P = importlib.util.module_from_spec(_spec)
sys.modules["portability"] = P
_spec.loader.exec_module(P)

NEHALEM_FLAGS = "fpu sse sse2 pni ssse3 sse4_1 sse4_2 popcnt"
ZEN4_FLAGS = (NEHALEM_FLAGS + " avx avx2 fma f16c avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 "
              "avx512vnni")
SPR_FLAGS = ZEN4_FLAGS + " amx_bf16 amx_tile amx_int8 avx512_fp16"


def cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n"


@pytest.mark.parametrize("flags, families", [
    ("fpu sse sse2", []),
    (NEHALEM_FLAGS, ["Prescott", "Nehalem"]),
    (NEHALEM_FLAGS + " avx", ["Prescott", "Nehalem", "Sandybridge"]),
    (NEHALEM_FLAGS + " avx2 fma", ["Prescott", "Nehalem"]),  # AVX2 without AVX: not a machine to trust
    (ZEN4_FLAGS, ["Prescott", "Nehalem", "Sandybridge", "Haswell", "Zen", "SkylakeX", "Cooperlake"]),
    (SPR_FLAGS, list(P.FAMILIES)),
    (ZEN4_FLAGS.replace(" avx512vl", ""), ["Prescott", "Nehalem", "Sandybridge", "Haswell", "Zen"]),
])
def test_families_follow_the_cpu_flags(flags, families):
    assert P.executable_families(P.cpu_flags(cpuinfo(flags))) == families


def test_the_matrix_covers_each_family_generic_numba_and_both_thread_counts():
    variants = [P.Variant(*row) for row in P.MATRIX]
    assert sorted(v.family for v in variants) == sorted(P.FAMILIES)  # each family exactly once
    assert len({v.family for v in variants if v.numba == "generic"}) >= 2
    assert {v.threads for v in variants} == {1, 2}
    assert all(P.parse_variant(v.name) == v for v in variants)


def test_variant_names_and_their_errors():
    assert P.parse_variant("Nehalem-generic-1") == P.Variant("Nehalem", "generic", 1)
    assert P.parse_variant("skylakex-host-2").name == "skylakex-host-2"
    for bad in ("nehalem", "nehalem-avx-1", "pentium-host-1", "haswell-host-0"):
        with pytest.raises(P.UsageError, match="FAMILY-NUMBA-THREADS"):
            P.parse_variant(bad)


def report(kernels=("Nehalem",), threads=1, cpu="generic", cache="/c/numba-generic", rc=0):
    return {"rc": rc, "openblas": [(k, threads) for k in kernels], "numba_cpu": cpu, "numba_cache": cache}


def test_a_variant_that_ran_as_asked_passes_the_check():
    v = P.Variant("Nehalem", "generic", 1)
    assert P.check_report(v, report(("Nehalem", "Nehalem")), "/c/numba-generic", "znver4") == []
    prescott = P.Variant("Prescott", "host", 2)  # x86-64 OpenBLAS names its Prescott kernels Katmai
    assert P.check_report(prescott, report(("Katmai",), 2, "znver4", "/c/numba-host"), "/c/numba-host", "znver4") == []
    assert P.ran_text(prescott, report(("Katmai",), 2, "znver4")) == "Prescott (says Katmai), numba znver4"


@pytest.mark.parametrize("changed, words", [
    (dict(kernels=("SkylakeX",)), "asked for Nehalem kernels"),
    (dict(kernels=("Nehalem", "Haswell")), "asked for Nehalem kernels"),  # scipy's library fell back
    (dict(kernels=()), "no OpenBLAS"),
    (dict(threads=2), "thread"),
    (dict(cpu="znver4"), "asked numba for generic"),
    (dict(cache="/elsewhere"), "cached its kernels in /elsewhere"),
    (dict(rc=4), "exit status 4"),
])
def test_a_variant_that_did_not_run_as_asked_is_caught(changed, words):
    problems = P.check_report(P.Variant("Nehalem", "generic", 1), report(**changed), "/c/numba-generic", "znver4")
    assert len(problems) == 1 and words in problems[0], problems


def test_junit_counts(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad[f32]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_setup"><error message="y"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="z"/></testcase>'
        '</testsuite></testsuites>', encoding="utf-8")
    assert P.junit_counts(tmp_path / "j.xml") == (1, 2, 1, ["tests.test_a::test_bad[f32]", "tests.test_b::test_setup"])


def test_the_table_lists_every_variant_and_why_one_did_not_run():
    ran = P.Outcome(P.Variant("Nehalem", "generic", 1), ran="Nehalem, numba generic", passed=10, failed=1,
                    seconds=12.3)
    wrong = P.Outcome(P.Variant("Haswell", "host", 2), ran="SkylakeX, numba znver4", passed=3,
                      problems=("asked for Haswell kernels, OpenBLAS ran SkylakeX",))
    text = P.table([ran, wrong], [(P.Variant("Zen", "host", 2), "not in this OpenBLAS build")])
    lines = text.splitlines()
    assert lines[0].split() == ["variant", "ran", "as", "asked", "passed", "failed", "skipped", "seconds"]
    assert lines[2].split()[0] == "nehalem-generic-1" and lines[2].split()[-5:] == ["yes", "10", "1", "0", "12"]
    assert lines[3].split()[0] == "haswell-host-2" and lines[3].split()[-5] == "no"
    assert "zen-host-2" in lines[4] and "not run: not in this OpenBLAS build" in lines[4]
