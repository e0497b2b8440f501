"""Fresh random inputs on every run, and the way to replay one.

Each run draws a base seed (or takes ``PYINF_TEST_SEED``); every test starts from torch's
global generator seeded with that base and its own name, and the tiny models and data sets
of :mod:`tests.models` add the base to the seeds they are given, so that ``seed=1`` and
``seed=2`` still differ and two uses of ``seed=1`` in one test still agree. A failing test
reports ``PYINF_TEST_SEED=<base>``: set it to see the same inputs again.
"""
import os
import secrets
import zlib

# Set in the environment as soon as it is drawn: pytest-xdist's workers, started after this
# module is imported by the controller's conftest, inherit it and draw the same inputs.
BASE = int(os.environ.get("PYINF_TEST_SEED") or secrets.randbelow(2**31))
os.environ["PYINF_TEST_SEED"] = str(BASE)


def offset(seed: int) -> int:
    """A data or model seed of this run."""
    return BASE + int(seed)


def for_test(nodeid: str) -> int:
    """The global generator's seed for one test."""
    return BASE + zlib.crc32(nodeid.encode())
