"""Kernel tests run the Triton kernels on the CPU interpreter (TRITON_INTERPRET=1) at tiny shapes.

The variable must be set before triton is imported, hence here. One interpreter fix is applied: Triton
3.6's interpreter converts scalars with ``int(ndarray)``, which numpy >= 2.4 refuses for the 1-element
arrays it uses (TypeError in any loop with tensor bounds); we make ``__index__`` take the single element.

Mutation check (see _mutation.py): with DSASERVE_KERNEL_MUTATE=<target> one kernel or reference function
returns 7 * x + 3 for the whole session, and value-checking tests must fail.
"""

import json
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"

from ._mutation import ENV, LOG_ENV, mutated, resolve  # noqa: E402


def _fix_interpreter_index() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the Triton tests skip themselves
        return
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_dsaserve_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._dsaserve_fixed = True
    interpreter._patch_lang_tensor = patched


_fix_interpreter_index()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "checks(*targets): the kernel/reference functions whose values this test checks "
        "(tests/kernels/_mutation.py TARGETS); the mutation report requires it to fail under each")


@pytest.fixture(autouse=True)
def _kernel_mutation(monkeypatch):
    target = os.environ.get(ENV)
    if target:
        mod, attr = resolve(target)
        monkeypatch.setattr(mod, attr, mutated(getattr(mod, attr)))
    yield


def pytest_runtest_logreport(report):
    """With DSASERVE_KERNEL_MUTATE_LOG set, append {test, outcome, checks} per test (the report reads it)."""
    path = os.environ.get(LOG_ENV)
    if not path or report.when != "call" and not (report.when == "setup" and report.failed):
        return
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid, "outcome": report.outcome,
                            "checks": sorted(_CHECKS.get(report.nodeid, ()))}) + "\n")


_CHECKS: dict[str, set] = {}


def pytest_collection_modifyitems(items):
    for item in items:
        _CHECKS[item.nodeid] = {t for m in item.iter_markers("checks") for t in m.args}
