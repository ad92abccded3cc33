"""Run a GPU benchmark script on this CPU-only machine, to catch its own bugs before device time is spent on it (no
figure it prints means anything): Triton kernels on the interpreter, "cuda" tensors and generators made on the CPU,
``triton.testing.do_bench`` calling the function once, and REPLACE="old=>new;;old2=>new2" edits of the script's text
(smaller shapes, a CUDA-only op swapped). Gluon kernels cannot run here; the dispatchers fall back to Triton.

    REPLACE='...' PYTHONPATH=. python benchmarks/cpu_smoke.py benchmarks/SCRIPT.py [its arguments]
"""
import functools
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402
import triton.testing  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
_orig = interpreter._patch_lang_tensor


def _patched(tensor, scope):  # numpy >= 2.4 refuses int() of a 1-element array (as tests/kernels/conftest.py)
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patched
torch.cuda.is_available = lambda: True
torch.cuda.get_device_name = lambda *a: "cpu-smoke"


def on_cpu(factory):
    """A tensor factory that makes device="cuda" tensors on the CPU."""
    @functools.wraps(factory)
    def made_here(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)
    return made_here


for name in ("randn", "randint", "empty", "zeros", "full", "ones", "arange", "tensor"):
    setattr(torch, name, on_cpu(getattr(torch, name)))
_G = torch.Generator


class CpuGenerator(_G):
    def __new__(cls, device="cpu"):
        return _G("cpu")


torch.Generator = CpuGenerator


def one_call(fn, *args, **kwargs):
    """do_bench's stand-in: run fn once (its code is what is checked), report 0.1 ms."""
    fn()
    return 0.1


triton.testing.do_bench = one_call
script = sys.argv[1]
src = open(script).read()
for edit in os.environ.get("REPLACE", "").split(";;"):
    if edit:
        old, new = edit.split("=>")
        assert old in src, old
        src = src.replace(old, new)
sys.argv = [script] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
exec(compile(src, script, "exec"), {"__name__": "__main__", "__file__": script})
