"""Static checks of the v2 CUDA decode kernel (``pq_cuda_v2.cu``) without a GPU, as
:mod:`fasq.kernels.cuda_static` does for v1: nvcc cubins for sm_80 and sm_90, registers, spills,
shared memory, and instructions per code from the SASS.

How the SASS is counted.  The main loop is, as for v1, the innermost loop holding ``HMMA`` and
``LDG``: here the ``while`` over a worker's stream, one round of ``DEPTH`` spans.  Inside it, code that
runs once per work unit, not once per span, is told apart by what it holds: the blocks a forward
branch skips that contain a store, an atomic or an integer division (``STG``, ``ATOM``, ``RED``,
``MUFU``: the unit's epilogue and the cursors' move to the next unit) and no ``HMMA``.  What is left is
the **steady-state round**, counted as written: every span's scale-group end is counted as taken
(it is taken once per ``spans_per_group`` spans), both sides of its other branches are counted.  So
``instr_per_code`` (steady-state round / codes one lane decodes in it) is an upper bound of what a
warp issues per 32 codes between unit boundaries; ``unit_instructions`` is the per-unit code, amortized
over a unit's ``per`` spans in ``amortized_per_code`` for the planned launch.

    python -m fasq.kernels.cuda_static_v2 [--arch sm_80,sm_90] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import cuda_decode_v2 as V
from . import cuda_layout as L
from . import cuda_static as cs

FUN = "fasq_pq_decode_v2"
CAPABILITY = {"sm_80": (8, 0), "sm_90": (9, 0)}
UNIT_MARKERS = ("STG", "ATOMG", "ATOM", "RED", "MUFU")


@dataclass(frozen=True)
class Case:
    """One layer shape (or fused layers) and token count; its launch is planned per card."""

    name: str
    outs: tuple          # rows of each fused layer
    inp: int
    k: int
    tokens: int
    dtype: torch.dtype = torch.float16
    group: int = 256
    bias: bool = False

    def layout(self) -> L.GpuLayout:
        """A layout of the right geometry (its tensors are empty: only shapes matter here)."""
        tiles = [-(-o // L.TILE_ROWS) for o in self.outs]
        n_spans = -(-self.inp // (L.SPAN_SUBS * L.D))
        cols = n_spans * L.SPAN_SUBS * L.D
        group_cols = self.group if self.group and self.group < self.inp else cols
        ends = tuple(sum(tiles[:p + 1]) for p in range(len(tiles)))
        return L.GpuLayout(L.LAYOUT_VERSION, L.layout_bits(self.k), sum(self.outs), self.inp, ends[-1], n_spans,
                           group_cols, torch.zeros(0, dtype=torch.int32),
                           torch.zeros(ends[-1], cols // group_cols, 8, 2, dtype=torch.float16), ends, self.outs)

    def launch(self, arch: str) -> Optional[V.Launch]:
        return V.plan(self.layout(), self.tokens, self.dtype, 132, CAPABILITY[arch], self.bias)


def representative_cases() -> list[Case]:
    """Every compile-time branch: 8- and 6-bit codes; 1 and 2 token tiles (ring depth 3 and 2, and 1
    for a short slice); fp16 and bf16; 1, 2 and 3 fused layers (one and two table regions); bias; a
    row that ends inside a span (the x tail)."""
    bf = torch.bfloat16
    return [Case("v2-k256-4096x4096-t1", (4096,), 4096, 256, 1),
            Case("v2-k64-4096x4096-t1", (4096,), 4096, 64, 1),
            Case("v2-k256-14336x4096-t8", (14336,), 4096, 256, 8),
            Case("v2-k64-4096x14336-t16-bf16", (4096,), 14336, 64, 16, bf),
            Case("v2-k256-4096x14336-t16", (4096,), 14336, 256, 16),
            Case("v2-k256-1024x4096-t1", (1024,), 4096, 256, 1),
            Case("v2-k256-qkv-t1", (4096, 1024, 1024), 4096, 256, 1),
            Case("v2-k64-gateup-t4-bf16", (14336, 14336), 4096, 64, 4, bf),
            Case("v2-k256-1000x1000-t3-bias", (1000,), 1000, 256, 3, group=0, bias=True)]


@dataclass
class Report:
    name: str
    arch: str
    bits: int
    nproj: int
    tokens: int
    nt: int
    depth: int
    slices: int
    per: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    local: int
    smem_block: int            # static + dynamic (table + alignment) + the system's reserve
    blocks_per_sm: int
    loop_instructions: int     # the whole main loop as written (unit code included)
    round_instructions: int    # its steady-state part (one round of `depth` spans)
    unit_instructions: int     # the per-unit part (epilogue, next unit's cursors)
    codes_per_round: int       # codes one lane decodes per round
    instr_per_code: float      # round_instructions / codes_per_round
    amortized_per_code: float  # with unit_instructions spread over a unit's spans
    prmt_lds_per_code: float   # the lookups: PRMT + LDS per code
    hmma_per_code: float
    local_in_loop: int
    code_bytes_in_flight_per_sm: int   # depth spans of codes per warp, every warp of the block
    mix: dict

    def row(self) -> str:
        return (f"| {self.name} | {self.arch} | {self.bits} | {self.tokens} | {self.depth} | {self.slices}x{self.per} | "
                f"{self.registers} | {self.spill_stores}/{self.spill_loads} | {self.smem_block} | "
                f"{self.round_instructions} / {self.codes_per_round} | {self.instr_per_code:.2f} | "
                f"{self.amortized_per_code:.2f} | {self.prmt_lds_per_code:.2f} | "
                f"{self.code_bytes_in_flight_per_sm // 1024} |")


TABLE_HEAD = ("| config | arch | bits | tokens | depth | slices x spans | regs | spill st/ld (B) | smem/block (B) | "
              "round instr / codes | instr/code | amortized | PRMT+LDS /code | code KiB in flight/SM |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def unit_code(body: list[cs.Instr]) -> set[int]:
    """Offsets of the main loop's per-unit code: what forward branches skip, where that holds a
    UNIT_MARKERS instruction and no HMMA."""
    skip: set[int] = set()
    for ins in body:
        m = re.match(r"BRA(?:\.\S+)?\s+(?:`\(\S+\)\s*)?(0x[0-9a-f]+)", ins.text)
        if ins.base != "BRA" or not m or int(m.group(1), 16) <= ins.offset:
            continue
        skipped = [j for j in body if ins.offset < j.offset < int(m.group(1), 16)]
        if any(j.base in UNIT_MARKERS for j in skipped) and not any(j.base == "HMMA" for j in skipped):
            skip |= {j.offset for j in skipped}
    return skip


def check(case: Case, arch: str, folder: Path) -> Optional[Report]:
    """The report of ``case`` on ``arch``, or None where the planner declines it on that card (fused
    q/k/v needs two 64 KiB table regions plus alignment: 191 KiB, over sm_80's 163)."""
    launch = case.launch(arch)
    if launch is None:
        return None
    stem = f"{case.name}-{arch}"
    src = folder / f"{stem}.cu"
    src.write_text(V.defines(launch) + V.source())
    cubin = folder / f"{stem}.cubin"
    text = cs._run([cs.find_tool("nvcc"), f"-arch={arch}", "-cubin", "--resource-usage", "-o", str(cubin), str(src)])
    px, res = cs.ptxas_report(text), cs.res_usage(cubin, FUN)
    body = cs.main_loop(cs.sass(cubin, FUN))
    unit = unit_code(body)
    hot = [i for i in body if i.offset not in unit]
    mix = collections.Counter(i.base for i in hot)
    codes = launch.depth * launch.rowt * 2 * L.LANE_CODES
    rounds_per_unit = launch.per / launch.depth
    amortized = (len(hot) * rounds_per_unit + len(unit)) / (codes * rounds_per_unit)
    card = cs.CARDS[arch]
    smem_block = res.get("SHARED", 0) + launch.smem_bytes + card.reserved_smem
    blocks = min(card.smem_per_sm // smem_block, (card.regs_per_sm // (-(-px["registers"] * 32 // 256) * 256))
                 // launch.nwarps)
    chunk_bytes = L.CHUNK_WORDS[launch.bits] * 4
    return Report(case.name, arch, launch.bits, launch.nproj, case.tokens, launch.nt, launch.depth, launch.slices,
                  launch.per, px["registers"], px["spill_stores"], px["spill_loads"], px["stack"], res.get("LOCAL", 0),
                  smem_block, blocks, len(body), len(hot), len(unit), codes, len(hot) / codes, amortized,
                  (mix["PRMT"] + mix["LDS"]) / codes, mix["HMMA"] / codes, mix["LDL"] + mix["STL"],
                  blocks * launch.nwarps * launch.depth * launch.rowt * chunk_bytes, dict(mix.most_common()))


def check_all(cases: list[Case], archs=("sm_80", "sm_90"), folder: Optional[Path] = None) -> list[Report]:
    with tempfile.TemporaryDirectory(prefix="fasq_static_v2_") as tmp:
        where = Path(folder or tmp)
        where.mkdir(parents=True, exist_ok=True)
        from concurrent.futures import ThreadPoolExecutor     # one nvcc per core
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            out = list(pool.map(lambda ca: check(ca[0], ca[1], where), [(c, a) for c in cases for a in archs]))
    return [r for r in out if r is not None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_80,sm_90")
    ap.add_argument("--json", help="write the reports here")
    ap.add_argument("--keep", help="keep the .cu / .cubin files in this folder")
    a = ap.parse_args(argv)
    missing = cs.missing_tools()
    if missing:
        print(f"cuda_static_v2: {', '.join(missing)} not found (PATH, nvidia-cuda-* wheels, CUDA_HOME)", file=sys.stderr)
        return 2
    reports = check_all(representative_cases(), tuple(a.arch.split(",")), Path(a.keep) if a.keep else None)
    print(f"nvcc {cs.nvcc_version()}, {len(reports)} builds")
    print(TABLE_HEAD)
    for r in reports:
        print(r.row())
    if a.json:
        tmp = Path(a.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(nvcc=cs.nvcc_version(), reports=[dataclasses.asdict(r) for r in reports]),
                                  indent=1))
        tmp.replace(a.json)
    bad = [r.name + "/" + r.arch for r in reports if r.spill_stores or r.spill_loads or r.local]
    if bad:
        print("spills or local memory in: " + ", ".join(bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
