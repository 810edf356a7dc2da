"""Fixtures shared by the CPU kernel tests (imported into each module, where the autouse ones apply)."""
import pytest

from fasq.kernels import cpu


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
    if not cpu.available():
        pytest.skip("the CPU kernel could not be built on this machine (see the warning)")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(cpu, "POISON", True)


def isas_here(isas) -> list[str]:
    """The instruction sets of ``isas`` that this CPU can run."""
    return [i for i in isas if cpu.ISAS[i] <= cpu.ISAS[cpu.default_isa()]]
