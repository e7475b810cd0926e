"""Test setup: the Triton interpreter on CPU, hypothesis profiles, the device fixture.

TRITON_INTERPRET must be set before triton is first imported, so it is set here,
at the top of the first module pytest loads. On a GPU machine run the suite with
TRITON_INTERPRET=0 to test the compiled kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("BSMOE_TEST_DEVICE") == "cuda" else "1")
# On a GPU, one kernel config per block size and dtype (kernels/config.py): the examples
# meet hundreds of shapes, and autotuning each would cost more than the tests themselves.
os.environ.setdefault("BSMOE_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
# ci: derandomized (the same examples every run) and bounded, for the 15-minute CI budget.
settings.register_profile("ci", derandomize=True, **_COMMON)
# long: random and ten times the examples, for a local soak (HYPOTHESIS_PROFILE=long).
settings.register_profile("long", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    return (
        f"torch {torch.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}, "
        f"hypothesis profile {settings._current_profile}"
    )


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when the suite runs on a GPU (interpreter off), else the CPU."""
    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
