"""Static checks of the CUDA decode kernel, no GPU needed (fasq.kernels.cuda_static).

Each configuration of ``pq_cuda.cu`` is compiled with nvcc for sm_80 and sm_90 and read from the
cubin: no spills, registers within budget, shared memory within the card's limit, and the main
loop's SASS instructions per code no higher than today's (a regression guard).  The default run
compiles the representative set (every compile-time branch, about 30 s on two cores);
FASQ_STATIC_FULL=1 compiles every distinct build the planner makes (264 builds x 2 archs: 6-12
12 minutes on two shared cores).  Skipped
where nvcc, cuobjdump or nvdisasm is missing (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm provide
the last two).
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest

from fasq.kernels import cuda_static as cs

ARCHS = ("sm_80", "sm_90")
FULL = os.environ.get("FASQ_STATIC_FULL", "0") == "1"

# Registers per thread: 16 resident warps per multiprocessor (two 8-warp blocks, which the planner's
# SMEM_MAX_BYTES assumes, or one 16-warp block) leave 65536 / (16 * 32) = 128.  16 warps keep one span
# of codes per warp in flight: 32 KiB per SM at d = 2, K = 256, against the ~22 KiB that Little's law
# asks of an H200 at its copy bandwidth (docs/kernels_gpu.md, "Static budgets").
REGISTER_BUDGET = 128
# Builds allowed the whole 255 of __launch_bounds__(256): 4 row tiles per warp (the planner's choice for
# tall layers, one 8-warp block per SM by design: 4 tiles' codes per warp in flight instead) and the
# plain lookups (FQ_FAST=0, a fallback kept for comparison).
REGISTER_BUDGET_WIDE = 255

# Main-loop SASS instructions per code (per lane: loop instructions / codes one lane decodes per
# iteration), nvcc 13.0, recorded 2026-12-06 (python -m fasq.kernels.cuda_static): (sm_80, sm_90).
# A guard against regressions, not a target: the issue-21 target for a future kernel is about 2
# (INSTR_PER_CODE_TARGET); the budgets that put it there are in docs/kernels_gpu.md.
RECORDED_NVCC = "13.0"
TODAY_INSTR_PER_CODE = {
    "d2k256": (4.78, 4.86),
    "d2k256-tall": (4.17, 4.3),
    "d2k256-16warps": (4.8, 4.89),
    "d2k64": (5.94, 6.03),
    "d2k64-split": (5.95, 6.02),
    "d4k4096": (12.19, 11.29),
    "d4k256": (8.36, 8.43),
    "d2k16-noscales-rowt4-16warps": (4.85, 4.9),
    "d2k512-rot256": (6.23, 6.3),
    "d2k1024-rot1024": (7.46, 6.6),
    "d2k64-rot16": (5.93, 6.0),
    "d2k256-bf16-rot256": (4.79, 4.86),
    "d2k256-bf16-rot256-outliers": (4.84, 5.09),
    "d2k256-plain": (8.44, 9.52),
}
# The full set's worst build per (d, K, FQ_FAST), same nvcc and date: the guard for builds without a
# figure of their own (FASQ_STATIC_FULL=1).
FULL_SET_MAX_INSTR_PER_CODE = {
    (2, 16, False): (7.4, 8.43), (2, 16, True): (5.04, 5.05),
    (2, 64, False): (8.82, 9.94), (2, 64, True): (6.0, 6.11),
    (2, 256, False): (8.9, 9.99), (2, 256, True): (4.84, 5.22),
    (2, 512, False): (8.93, 10.1), (2, 512, True): (6.29, 6.37),
    (2, 1024, False): (9.69, 11.0), (2, 1024, True): (7.57, 6.71),
    (2, 4096, False): (9.85, 11.16), (2, 4096, True): (7.55, 8.0),
    (4, 16, False): (12.29, 13.32), (4, 16, True): (7.83, 7.79),
    (4, 256, False): (14.47, 15.69), (4, 256, True): (8.41, 8.5),
    (4, 4096, False): (17.19, 18.63), (4, 4096, True): (12.19, 11.44),
}
INSTR_PER_CODE_TARGET = 2.0
OTHER_NVCC_SLACK = 1.15   # another nvcc schedules differently: 15% leeway until its figures are recorded

MISSING = cs.missing_tools()
needs_tools = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not found (PATH, the nvidia-cuda-* "
                                                      "wheels or CUDA_HOME): static kernel checks need them")

CASES = cs.all_cases() if FULL else cs.representative_cases()
_DIR = tempfile.TemporaryDirectory(prefix="fasq_static_test_")


def known_spill(case: cs.Case) -> tuple[str, int]:
    """Why a build is known to spill today (nvcc 13.0, 2026-12-06) and the most local-memory
    instructions its main loop may hold; ('', 0) where it must not spill.  In the full set (264 builds
    x 2 archs) these are all that spill."""
    if not case.fast and (case.cfg.nwarps == 16 or case.cfg.rowt >= 4):
        return ("the plain lookups (FQ_FAST=0, the fallback) copy the next span's operands into the current "
                "ones: at 16 warps (128 registers) or 4 row tiles that spills into the main loop", 10**6)
    if case.cfg.rowt >= 4 and case.cfg.nwarps == 8:
        return ("4 row tiles per warp (the planner's choice for tall layers) keep two operand sets of "
                "4 tiles x 2 rows of code words: at the 255-register limit a few bytes spill", 2)
    if case.cfg.rowt >= 4:
        return ("4 row tiles at 16 warps (512 threads cap registers at 128): the planner never picks this, "
                "only a forced launch or a TUNED sweep result does, and then the main loop spills", 10**6)
    return "", 0


def register_budget(case: cs.Case) -> int:
    return REGISTER_BUDGET_WIDE if case.cfg.rowt >= 4 or not case.fast else REGISTER_BUDGET


@functools.lru_cache(maxsize=None)
def report(name: str, arch: str) -> cs.Report:
    case = next(c for c in CASES if c.name == name)
    return cs.check(case, arch, Path(_DIR.name))


def params():
    return [pytest.param(c, a, id=f"{c.name}-{a}") for c in CASES for a in ARCHS]


@needs_tools
@pytest.mark.parametrize("case,arch", params())
def test_no_spills_and_registers_within_budget(case, arch):
    r = report(case.name, arch)
    assert r.registers <= register_budget(case), f"{case.name} {arch}: {r.registers} registers"
    if r.spill_stores or r.spill_loads or r.local:
        reason, loop_local = known_spill(case)
        if reason:
            assert r.local_in_loop <= loop_local, f"{case.name} {arch}: {r.local_in_loop} local accesses in the loop"
            pytest.xfail(f"{r.spill_stores} bytes spilled: {reason}")
    assert (r.spill_stores, r.spill_loads, r.local) == (0, 0, 0), f"{case.name} {arch}: spills {r}"


@needs_tools
@pytest.mark.parametrize("case,arch", params())
def test_shared_memory_fits_the_card_and_a_block_fits_a_multiprocessor(case, arch):
    r = report(case.name, arch)
    card = cs.CARDS[arch]
    assert r.smem_static + r.smem_dynamic <= card.smem_per_block
    assert r.blocks_per_sm >= 1


@needs_tools
@pytest.mark.parametrize("case,arch", params())
def test_main_loop_instructions_per_code_not_above_today(case, arch):
    r = report(case.name, arch)
    # The loop found is the one that decodes: it holds the lookups, the code loads and whole spans of mma.
    assert r.lds_per_code >= 1.0 and r.ldg_per_code > 0
    assert r.codes_per_iteration % (2 * case.cfg.run * case.cfg.rowt) == 0
    today = TODAY_INSTR_PER_CODE.get(case.name) or FULL_SET_MAX_INSTR_PER_CODE.get((case.cfg.d, case.k, case.fast))
    if today is None:
        pytest.skip(f"no recorded figure for d = {case.cfg.d}, K = {case.k}")
    limit = today[ARCHS.index(arch)] * (1.0 if cs.nvcc_version() == RECORDED_NVCC else OTHER_NVCC_SLACK)
    assert r.instr_per_code <= limit + 1e-9, f"{case.name} {arch}: {r.instr_per_code:.3f} > {limit:.3f} per code"
    assert r.instr_per_code > INSTR_PER_CODE_TARGET   # when this fails, the target is met: update the docs


# ---------------------------------------------------------------------------------------------
# No tools needed: the SASS reader and the budgets' arithmetic.

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0030*/                   LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
        /*0040*/                   LDS R12, [R3] ;
        /*0050*/                   HMMA.16816.F32 R16, R8, R12, R16 ;
        /*0060*/               @P0 BRA 0x80 ;
        /*0070*/                   FADD R2, R2, R2 ;
        /*0080*/              @!P1 BRA 0x30 ;
        /*0090*/              @!P2 BRA 0x10 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_sass_reader_finds_the_innermost_loop_with_mma_and_loads(monkeypatch):
    monkeypatch.setattr(cs, "_run", lambda cmd: SASS)
    monkeypatch.setattr(cs, "find_tool", lambda name: name)
    instrs = cs.sass(Path("x.cubin"))
    assert [i.base for i in instrs][:3] == ["MOV", "LDG", "IADD3"] and instrs[6].opcode == "BRA"
    assert cs.loops(instrs) == [(0x30, 0x80), (0x10, 0x90)]        # the self-branch trap is no loop
    body = cs.main_loop(instrs)
    assert (body[0].offset, body[-1].offset) == (0x30, 0x80) and len(body) == 6


def test_budget_arithmetic():
    h200 = next(m for m in cs.MACHINES if m.name.startswith("H200"))
    b = cs.budget(h200, bits_per_code=8, fraction=1.0, latency_s=700e-9)
    per_cycle = 4.22e12 / (132 * 1.98e9)                       # 16.15 bytes per SM per cycle
    assert b["bytes_per_sm_cycle"] == pytest.approx(per_cycle)
    assert b["issue_slots_per_code"] == pytest.approx(128 / per_cycle)     # 7.93 lane-instructions per code
    assert b["bytes_in_flight_per_sm"] == pytest.approx(per_cycle * 1386)  # 700 ns x 1.98 GHz cycles
    b6 = cs.budget(h200, bits_per_code=6, fraction=0.75)
    assert b6["codes_per_sm_cycle"] == pytest.approx(0.75 * per_cycle * 8 / 6)


def test_representative_set_covers_every_compile_time_branch():
    cases = cs.representative_cases()
    cfgs = [c.cfg for c in cases]
    assert {c.d for c in cfgs} == {2, 4}
    assert {cs.cd._vec_words(c.run * c.bits // 32) for c in cfgs} == {1, 2, 4}       # 4-, 2- and 1-word code loads
    assert 8 in {c.bits for c in cfgs} and any(32 % c.bits for c in cfgs)            # PRMT path, straddling codes
    assert any(c.run * c.bits // 32 > 8 for c in cfgs)                               # 9- to 12-word runs
    for field in ("repl", "scales", "bf16", "outliers"):
        assert {getattr(c, field) for c in cfgs} == {True, False}, field
    assert {1, 4} <= {c.rowt for c in cfgs} and {8, 16} <= {c.nwarps for c in cfgs}
    rots = {c.rotb for c in cfgs}
    assert 0 in rots and any(0 < r <= 32 for r in rots) and any(r > 32 for r in rots)   # ROT_E = 1 and > 1
    assert {c.split for c in cases} == {True, False} and {c.fast for c in cases} == {True, False}
    assert {0 if c.split else c.bias_kind for c in cases} == {0, 1, 2, 3}
    assert len({c.key for c in cases}) == len(cases) and len({c.name for c in cases}) == len(cases)
