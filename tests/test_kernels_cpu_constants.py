"""What Python and the C++ CPU kernel must agree on: the constants and the `meta` layout the library
exports, the build key covering every source file, and the private nn.Module fields the Plan reads."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.modules.module as module_py

from fasq import native
from fasq.format import LayerSpec
from fasq.kernels import cpu

from cpu_kernel_support import kernel_built, poison  # noqa: F401  (autouse fixtures)
from test_kernels_cpu import random_layer


def test_library_exports_the_constants_python_uses():
    theirs = dict(cpu._lib.constants())
    assert theirs == cpu.python_constants()
    assert theirs["rows_per_block"] == cpu.ROWS_PER_BLOCK and theirs["plan_tokens"] == cpu.FEW_MAX_TOKENS
    assert tuple(theirs["meta_fields"]) == cpu.META_FIELDS
    assert theirs["modes"] == cpu._MODE and set(theirs["modes"]) == set(cpu.METHODS)
    assert theirs["isas"] == cpu.ISAS


def test_a_mismatch_is_refused():
    class Lib:
        @staticmethod
        def constants():
            return {**cpu.python_constants(), "rows_per_block": 32}
    with pytest.raises(RuntimeError, match="rows_per_block"):
        cpu._check_constants(Lib)


def test_meta_is_built_by_field_name():
    spec = LayerSpec(200, 130, 3, 512, num_codebooks=2, group_size=24, rotation_block=8, has_bias=True)
    meta = dict(zip(cpu.META_FIELDS, cpu._meta(spec, "tiled", "avx2")))
    assert len(meta) == len(cpu._meta(spec, "tiled", "avx2")) == len(cpu._lib.constants()["meta_fields"])
    assert meta == {"in_features": 200, "out_features": 130, "subvector_dim": 3, "num_centroids": 512,
                    "num_codebooks": 2, "bits": 9, "n_sub": spec.n_sub, "group_subvectors": 8,
                    "n_groups": spec.n_groups, "rotation_block": 8, "mode": cpu._MODE["tiled"],
                    "isa": cpu.ISAS["avx2"], "padded_dim": 4, "table_size": 512,
                    "words_per_row": spec.words_per_row, "poison": int(cpu.POISON)}
    # the fake implementation reads out_features by name too
    x = torch.empty(3, 200, device="meta")
    assert cpu._fake_cpu_pq_linear(x, None, None, None, None, None, cpu._meta(spec, "tiled", "avx2")).shape == (3, 130)


def test_build_key_covers_every_included_file(tmp_path):
    """The cache key hashes pq_cpu.cpp and every header it includes, so that editing a header rebuilds."""
    included = set()
    for f in (cpu.SOURCE, *cpu.HEADERS):
        for name in re.findall(r'^#include "([^"]+)"', f.read_text(), re.M):
            included.add((f.parent / name).resolve())
    assert included and included <= {h.resolve() for h in cpu.HEADERS}
    src = tmp_path / "pq_cpu.cpp"
    shutil.copytree(cpu.HEADERS[0].parent, tmp_path / "pq_cpu")
    shutil.copy(cpu.SOURCE, src)
    headers = tuple(sorted((tmp_path / "pq_cpu").glob("*.h")))
    key = native.build_key(src, ["-O3"], headers)
    assert key == native.build_key(cpu.SOURCE, ["-O3"], cpu.HEADERS)
    with open(headers[-1], "a") as f:
        f.write("\n")
    assert native.build_key(src, ["-O3"], headers) != key


def test_module_call_fields_exist_in_this_torch():
    """A torch that renamed one of these would make the Plan step aside for good (slow, not wrong)."""
    f = cpu.module_call_fields()
    m = torch.nn.Linear(2, 2)
    for name in (*f["instance_hooks"], f["buffers"]):
        assert isinstance(m.__dict__.get(name), dict), name
    for name in f["global_hooks"]:
        assert isinstance(f["globals"].get(name), dict), name
    assert f["globals"] is vars(module_py)
    m.compile(backend="eager")
    assert f["compiled"] in m.__dict__


HOOKS = {
    "forward hook": lambda m, seen: m.register_forward_hook(lambda *a: seen.append(1)),
    "forward pre-hook": lambda m, seen: m.register_forward_pre_hook(lambda *a: seen.append(1)),
    "full backward hook": lambda m, seen: m.register_full_backward_hook(lambda *a: seen.append(1)),
    "backward pre-hook": lambda m, seen: m.register_full_backward_pre_hook(lambda *a: seen.append(1)),
    "global forward hook": lambda m, seen: module_py.register_module_forward_hook(lambda *a: seen.append(1)),
    "global forward pre-hook": lambda m, seen: module_py.register_module_forward_pre_hook(lambda *a: seen.append(1)),
    "global full backward hook": lambda m, seen: module_py.register_module_full_backward_hook(
        lambda *a: seen.append(1)),
    "global backward pre-hook": lambda m, seen: module_py.register_module_full_backward_pre_hook(
        lambda *a: seen.append(1)),
}


@pytest.mark.parametrize("kind", HOOKS)
def test_plan_steps_aside_for_hooks(kind):
    layer = random_layer(LayerSpec(64, 48, 2, 256, group_size=32, rotation_block=16))
    x = torch.randn(2, 64)
    with torch.no_grad():
        y = layer(x)
        layer(x)
        plan = layer.__dict__["_fasq_plan"]
        from fasq import kernels
        assert torch.equal(plan.call(layer.__dict__, x, kernels._generation), y)
        seen = []
        handle = HOOKS[kind](layer, seen)
        try:
            assert plan.call(layer.__dict__, x, kernels._generation) is None
            assert torch.equal(layer(x), y)
            if "backward" not in kind:
                assert seen, f"the {kind} did not run"
        finally:
            handle.remove()
        assert torch.equal(plan.call(layer.__dict__, x, kernels._generation), y)
