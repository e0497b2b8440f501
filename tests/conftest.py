import os

import torch

# Triton kernels run on CPU through Triton's interpreter; it must be chosen before triton
# is imported anywhere. On a GPU machine the kernels run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests import seeds  # noqa: E402  (draws this run's base seed; see tests/seeds.py)


def pytest_report_header(config):
    return f"pyinf test inputs: PYINF_TEST_SEED={seeds.BASE} (set it to replay this run's random inputs)"


@pytest.fixture(autouse=True)
def _fresh_global_seed(request):
    """torch's global generator starts each test from this run's seed and the test's name:
    fresh inputs every run (torch's own default seed is the same in every process)."""
    torch.manual_seed(seeds.for_test(request.node.nodeid))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("pyinf test inputs", f"replay with PYINF_TEST_SEED={seeds.BASE}"))
