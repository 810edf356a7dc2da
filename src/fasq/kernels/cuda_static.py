"""Static checks of the CUDA decode kernel (``pq_cuda.cu``) without a GPU.

Every configuration is compiled with ``nvcc -cubin`` for sm_80 and sm_90 and read back from the
cubin: registers, spills and stack (ptxas' report and ``cuobjdump -res-usage``), static and dynamic
shared memory against the card's limits, the blocks that fit on one multiprocessor, and, from the
SASS (``cuobjdump -sass``), the main loop (the innermost loop whose body holds the tensor-core
``HMMA`` and the code loads) and its instructions per code.  docs/kernels_gpu.md ("Static budgets")
derives what those figures must be for the kernel to run at the copy bandwidth of an H100 / H200.

Needs ``nvcc`` (CUDA 12 or newer) and ``cuobjdump`` (the CUDA toolkit, or the
``nvidia-cuda-cuobjdump`` wheel, whose binary lands in ``site-packages/nvidia/cu13/bin``).
Nothing here needs a GPU or torch's CUDA build.  Command line::

    python -m fasq.kernels.cuda_static [--full] [--arch sm_80,sm_90] [--json out.json]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import cuda_decode as cd


@dataclass(frozen=True)
class Card:
    """The per-multiprocessor limits of one compute capability (CUDA C Programming Guide, table of
    technical specifications per compute capability)."""

    arch: str
    smem_per_sm: int          # shared memory of one multiprocessor (bytes)
    smem_per_block: int       # the most one block may opt in to (bytes)
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    reserved_smem: int = 1024   # the system's shared memory per block (sm_80 and newer)


CARDS = {"sm_80": Card("sm_80", 164 * 1024, 163 * 1024),     # A100
         "sm_90": Card("sm_90", 228 * 1024, 227 * 1024)}     # H100 / H200

# Formats (d, K, scale group, rotation block) and layer shapes (out, in) the configurations come from:
# the benchmark's three formats first (4-bit d2 K256, 3-bit d2 K64, 3-bit d4 K4096), then the others
# the planner serves (4- to 12-bit codes, one table copy at d = 2 from K = 1024).
FORMATS = [(2, 256, 256, 256), (2, 64, 256, 64), (4, 4096, 128, 128), (2, 16, 0, 0), (2, 512, 256, 256),
           (2, 1024, 512, 1024), (2, 4096, 256, 256), (4, 256, 256, 256), (4, 16, 0, 0)]
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]


@dataclass(frozen=True)
class Case:
    """One build of ``fasq_pq_decode`` and the launch its shared memory is sized for."""

    name: str
    cfg: cd.Config
    k: int
    tokens: int
    split: bool = False
    bias_kind: int = 0     # 0 none, 1 fp16, 2 bf16, 3 fp32 (FQ_BIAS)
    fast: bool = True      # FQ_FAST

    @property
    def defines(self) -> str:
        return cd._defines(self.cfg, self.split, 0 if self.split else self.bias_kind, self.fast)

    @property
    def key(self) -> tuple:
        return cd._build_key(self.cfg), self.split, 0 if self.split else self.bias_kind, self.fast

    @property
    def smem_dynamic(self) -> int:
        return cd._smem_bytes(self.cfg, self.k, self.tokens)

    @property
    def codes_per_lane_per_span(self) -> int:
        """Codes one lane decodes per span: RUN codes of rows g and g + 8 of each 16-row tile."""
        return self.cfg.rowt * 2 * self.cfg.run

    @property
    def code_bytes_per_warp_per_span(self) -> int:
        """Code bytes a warp loads per span (its 16 * ROWT rows x 4 * RUN codes)."""
        return 32 * self.cfg.rowt * 2 * (self.cfg.run * self.cfg.bits // 32) * 4


def _plan(name: str, tokens: int, out: int, inp: int, d: int, k: int, group: int, dtype=torch.float16,
          rot: int = 0, **kw) -> Case:
    n_groups = inp // group if group else 0
    cfg = cd.plan(tokens, inp, out, d, k, n_groups, group, dtype, "cpu", rot_block=rot, **kw)
    if cfg is None:
        raise ValueError(f"cuda_static: the planner declines {name}")
    return Case(name, cfg, k, tokens, split=cfg.splits > 1)


def representative_cases() -> list[Case]:
    """A set that covers every compile-time branch of the kernel: d = 2 and 4; 4-, 6-, 8-, 9-, 10- and
    12-bit codes (straddling or not, 1-, 2- and 4-word loads); the table per lane and one copy; 8 and
    16 warps; 1 and 4 row tiles; fp16 and bf16; scales or none; the rotation fused (one and several
    values per lane) or not; split-K; every bias dtype; fused outliers; the plain lookups.  All are the
    planner's own choices except ``-rowt4-16warps`` (a launch only a forced or TUNED sweep result makes)."""
    bf = torch.bfloat16
    cases = [_plan("d2k256", 1, 4096, 4096, 2, 256, 256),
             _plan("d2k256-tall", 1, 14336, 4096, 2, 256, 256),
             _plan("d2k256-16warps", 1, 1024, 4096, 2, 256, 256),
             _plan("d2k64", 1, 4096, 4096, 2, 64, 256),
             _plan("d2k64-split", 8, 1024, 4096, 2, 64, 256, bf, splits=4),
             _plan("d4k4096", 1, 4096, 4096, 4, 4096, 128),
             _plan("d4k256", 1, 4096, 4096, 4, 256, 256),
             _plan("d2k16-noscales-rowt4-16warps", 1, 1024, 4096, 2, 16, 0, rowt=4),
             _plan("d2k512-rot256", 1, 14336, 4096, 2, 512, 256, rot=256),
             _plan("d2k1024-rot1024", 1, 4096, 4096, 2, 1024, 512, rot=1024),
             _plan("d2k64-rot16", 2, 4096, 4096, 2, 64, 256, rot=16)]
    bf_rot = _plan("d2k256-bf16-rot256", 1, 4096, 4096, 2, 256, 256, bf, rot=256)
    cases += [dataclasses.replace(bf_rot, bias_kind=2),
              dataclasses.replace(bf_rot, name="d2k256-bf16-rot256-outliers",
                                  cfg=dataclasses.replace(bf_rot.cfg, outliers=True), bias_kind=3),
              dataclasses.replace(cases[0], name="d2k256-plain", fast=False, bias_kind=1)]
    return cases


def all_cases() -> list[Case]:
    """Every build the planner makes for FORMATS x SHAPES x 1-8 tokens x fp16/bf16 x rotation fused
    or not (with and without a bias), plus the plain-lookup and fused-outlier variants of each
    1-token fp16 build; one case per distinct build."""
    seen: dict[tuple, Case] = {}
    for (d, k, group, rot), (out, inp), tokens, dtype, rotate in itertools.product(
            FORMATS, SHAPES, range(1, cd.MAX_TOKENS + 1), (torch.float16, torch.bfloat16), (False, True)):
        name = f"d{d}k{k}-{out}x{inp}-t{tokens}-{'bf16' if dtype == torch.bfloat16 else 'fp16'}" + \
               (f"-rot{rot}" if rotate and rot else "")
        try:
            case = _plan(name, tokens, out, inp, d, k, group, dtype, rot=rot if rotate else 0)
        except ValueError:
            continue
        variants = [case, dataclasses.replace(case, name=name + "-bias", bias_kind=2 if dtype == torch.bfloat16 else 1)]
        if tokens == 1 and dtype == torch.float16:
            variants += [dataclasses.replace(case, name=name + "-plain", fast=False),
                         dataclasses.replace(case, name=name + "-outliers", cfg=dataclasses.replace(case.cfg, outliers=True))]
        for v in variants:
            old = seen.get(v.key)
            if old is None or v.smem_dynamic > old.smem_dynamic:   # keep the launch with the most shared memory
                seen[v.key] = v
    return list(seen.values())


# ---------------------------------------------------------------------------------------------
# Tools.

def find_tool(name: str) -> Optional[str]:
    """``name`` on PATH, else in the nvidia-cuda-* wheels' bin folder, else under CUDA_HOME."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia   # namespace package of NVIDIA's wheels
        folders = [Path(p) / sub / "bin" for p in nvidia.__path__ for sub in ("cu13", "cu12", "cuda_nvcc")]
    except ImportError:
        folders = []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for folder in folders + [Path(home) / "bin"]:
        if (folder / name).is_file() and os.access(folder / name, os.X_OK):
            return str(folder / name)
    return None


def missing_tools() -> list[str]:
    """The tools this module needs and cannot find (``cuobjdump -sass`` runs ``nvdisasm``)."""
    return [t for t in ("nvcc", "cuobjdump", "nvdisasm") if find_tool(t) is None]


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([find_tool("nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _run(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({r.returncode}): {r.stderr[-3000:]}")
    return r.stdout + r.stderr


def compile_cubin(case: Case, arch: str, folder: Path) -> tuple[Path, str]:
    """The cubin of ``case`` for ``arch`` and ptxas' report."""
    stem = f"{case.name}-{arch}"
    src = folder / f"{stem}.cu"
    src.write_text(case.defines + cd.source())
    cubin = folder / f"{stem}.cubin"
    report = _run([find_tool("nvcc"), f"-arch={arch}", "-cubin", "--resource-usage", "-diag-suppress", "177",
                   "-o", str(cubin), str(src)])
    return cubin, report


# ---------------------------------------------------------------------------------------------
# Reading the cubin.

def ptxas_report(text: str) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v`` (``--resource-usage``) output."""
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    r = re.search(r"Used (\d+) registers", text)
    if not m or not r:
        raise RuntimeError(f"cuda_static: no resource report in nvcc's output: {text[-1000:]}")
    return dict(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)),
                registers=int(r.group(1)))


def res_usage(cubin: Path, fun: str = "fasq_pq_decode") -> dict:
    """``cuobjdump -res-usage`` of the kernel: REG, STACK, SHARED (static), LOCAL, ..."""
    text = _run([find_tool("cuobjdump"), "-res-usage", str(cubin)])
    m = re.search(rf"Function {fun}:\s*\n\s*(.*)", text)
    if not m:
        raise RuntimeError(f"cuda_static: {fun} not in cuobjdump -res-usage: {text[-1000:]}")
    return {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(1))}


@dataclass(frozen=True)
class Instr:
    offset: int
    opcode: str      # e.g. "LDS", "HMMA.16816.F32" (predicate removed)
    text: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass(cubin: Path, fun: str = "fasq_pq_decode") -> list[Instr]:
    """The kernel's SASS, one Instr per instruction."""
    text = _run([find_tool("cuobjdump"), "-sass", "-fun", fun, str(cubin)])
    out = []
    for off, body in _SASS_LINE.findall(text):
        body = re.sub(r"^@!?U?P[T0-9]+\s+", "", body.strip())
        out.append(Instr(int(off, 16), body.split()[0], body))
    if not out:
        raise RuntimeError("cuda_static: no SASS read from the cubin")
    return out


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) offsets of every loop: a branch back to an earlier instruction."""
    found = []
    for ins in instrs:
        m = re.match(r"BRA(?:\.\S+)?\s+(?:`\(\S+\)\s*)?(0x[0-9a-f]+)", ins.text)
        if ins.base == "BRA" and m and int(m.group(1), 16) < ins.offset:
            found.append((int(m.group(1), 16), ins.offset))
    return found


def main_loop(instrs: list[Instr]) -> list[Instr]:
    """The innermost loop whose body holds both tensor-core products and global loads (the codes)."""
    best = None
    for first, last in loops(instrs):
        body = [i for i in instrs if first <= i.offset <= last]
        if any(i.base == "HMMA" for i in body) and any(i.base == "LDG" for i in body):
            if best is None or len(body) < len(best):
                best = body
    if best is None:
        raise RuntimeError("cuda_static: no loop with HMMA and LDG in the SASS")
    return best


# ---------------------------------------------------------------------------------------------
# One configuration on one card.

@dataclass
class Report:
    name: str
    arch: str
    bits: int
    d: int
    k: int
    run: int
    nwarps: int
    rowt: int
    bf16: bool
    repl: bool
    rotb: int
    split: bool
    fast: bool
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    local: int
    smem_static: int
    smem_dynamic: int
    smem_block: int          # static + dynamic + the system's reserve
    blocks_per_sm: int
    warps_per_sm: int
    loop_instructions: int   # SASS instructions between the main loop's first and its back branch
    codes_per_iteration: int  # codes one lane decodes per iteration
    instr_per_code: float
    lds_per_code: float
    hmma_per_code: float
    ldg_per_code: float
    local_in_loop: int       # LDL / STL instructions in the main loop (spills the loop pays for)
    code_bytes_in_flight_per_sm: int   # one span ahead per resident warp (the kernel's prefetch depth)
    mix: dict               # opcode (base) -> count in the main loop

    def row(self) -> str:
        return (f"| {self.name} | {self.arch} | {self.registers} | {self.spill_stores}/{self.spill_loads} | "
                f"{self.smem_block} | {self.blocks_per_sm}x{self.nwarps} | {self.loop_instructions} | "
                f"{self.codes_per_iteration} | {self.instr_per_code:.2f} | {self.lds_per_code:.2f} | "
                f"{self.code_bytes_in_flight_per_sm // 1024} |")


TABLE_HEAD = ("| config | arch | regs | spill st/ld (B) | smem/block (B) | blocks x warps /SM | loop instr | "
              "codes/lane/iter | instr/code | LDS/code | code KiB in flight/SM |\n"
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def occupancy(case: Case, registers: int, smem_block: int, card: Card) -> int:
    """Blocks of ``case`` resident on one multiprocessor (registers allocated per warp in units of 256)."""
    threads = 32 * case.cfg.nwarps
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (card.regs_per_sm // per_warp) // case.cfg.nwarps
    by_smem = card.smem_per_sm // smem_block
    return min(by_regs, by_smem, card.threads_per_sm // threads, card.blocks_per_sm)


def check(case: Case, arch: str, folder: Path) -> Report:
    card = CARDS[arch]
    cubin, text = compile_cubin(case, arch, folder)
    px, res = ptxas_report(text), res_usage(cubin)
    if px["registers"] != res.get("REG"):
        raise RuntimeError(f"cuda_static: ptxas says {px['registers']} registers, cuobjdump {res.get('REG')}")
    body = main_loop(sass(cubin))
    mix = collections.Counter(i.base for i in body)
    hmma = mix["HMMA"]
    codes = hmma * 8 // case.cfg.d     # per lane and mma: 4 codes at d = 2 (one A register each), 2 at d = 4
    smem_block = res.get("SHARED", 0) + case.smem_dynamic + card.reserved_smem
    blocks = occupancy(case, px["registers"], smem_block, card)
    c = case.cfg
    return Report(case.name, arch, c.bits, c.d, case.k, c.run, c.nwarps, c.rowt, c.bf16, c.repl, c.rotb, case.split,
                  case.fast, px["registers"], px["spill_stores"], px["spill_loads"], px["stack"], res.get("LOCAL", 0),
                  res.get("SHARED", 0), case.smem_dynamic, smem_block, blocks, blocks * c.nwarps, len(body), codes,
                  len(body) / codes, mix["LDS"] / codes, hmma / codes, mix["LDG"] / codes, mix["LDL"] + mix["STL"],
                  blocks * c.nwarps * case.code_bytes_per_warp_per_span, dict(mix.most_common()))


def check_all(cases: list[Case], archs=("sm_80", "sm_90"), folder: Optional[Path] = None) -> list[Report]:
    """Compile and read every case for every arch (in a temporary folder unless ``folder``)."""
    with tempfile.TemporaryDirectory(prefix="fasq_static_") as tmp:
        where = Path(folder or tmp)
        where.mkdir(parents=True, exist_ok=True)
        # nvcc runs are independent processes: one per core (the GPU machine has 16).
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return list(pool.map(lambda ca: check(ca[0], ca[1], where), [(c, a) for c in cases for a in archs]))


# ---------------------------------------------------------------------------------------------
# Budgets (docs/kernels_gpu.md, "Static budgets").

@dataclass(frozen=True)
class Machine:
    name: str
    copy_bytes_per_s: float   # measured device-to-device copy, (read + written) / time
    sms: int
    clock_hz: float           # SM clock under load


MACHINES = [Machine("H100 SXM (copy 3.0 TB/s measured)", 3.0e12, 132, 1.98e9),
            Machine("H200 (copy 4.22 TB/s measured)", 4.22e12, 132, 1.98e9)]
ISSUE_PER_SM_CYCLE = 4 * 32     # 4 schedulers, one warp instruction (32 lanes) each per cycle
LDS_WAVEFRONTS_PER_SM_CYCLE = 1  # 128 B/cycle of shared memory: one 32-lane 4-byte wavefront


def budget(machine: Machine, bits_per_code: float, fraction: float, latency_s: float = 700e-9) -> dict:
    """What one SM must sustain for the kernel to stream its codes at ``fraction`` of the copy bandwidth."""
    bytes_per_cycle = fraction * machine.copy_bytes_per_s / (machine.sms * machine.clock_hz)
    codes_per_cycle = bytes_per_cycle * 8 / bits_per_code
    return dict(machine=machine.name, bits_per_code=bits_per_code, fraction=fraction,
                bytes_per_sm_cycle=bytes_per_cycle, codes_per_sm_cycle=codes_per_cycle,
                issue_slots_per_code=ISSUE_PER_SM_CYCLE / codes_per_cycle,
                bytes_in_flight_per_sm=bytes_per_cycle * latency_s * machine.clock_hz)


def budgets() -> list[dict]:
    return [budget(m, bits, f) for m in MACHINES for bits in (8, 6, 12) for f in (0.75, 1.0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every distinct build (all_cases), not the representative set")
    ap.add_argument("--arch", default="sm_80,sm_90")
    ap.add_argument("--json", help="write the reports and budgets here")
    ap.add_argument("--keep", help="keep the .cu / .cubin files in this folder")
    ap.add_argument("--strict", action="store_true", help="exit 1 where a build spills")
    a = ap.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"cuda_static: {', '.join(missing)} not found (PATH, nvidia-cuda-* wheels, CUDA_HOME)", file=sys.stderr)
        return 2
    cases = all_cases() if a.full else representative_cases()
    reports = check_all(cases, tuple(a.arch.split(",")), Path(a.keep) if a.keep else None)
    print(f"nvcc {nvcc_version()}, {len(cases)} configurations")
    print(TABLE_HEAD)
    for r in reports:
        print(r.row())
    if a.json:
        tmp = Path(a.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(nvcc=nvcc_version(), reports=[dataclasses.asdict(r) for r in reports],
                                       budgets=budgets()), indent=1))
        tmp.replace(a.json)
    bad = [r.name + "/" + r.arch for r in reports if r.spill_stores or r.spill_loads or r.local]
    if bad:
        print("spills or local memory in: " + ", ".join(bad), file=sys.stderr)
    return 1 if bad and a.strict else 0


if __name__ == "__main__":
    sys.exit(main())
