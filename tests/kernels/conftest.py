"""Kernel tests run the Triton kernels on the CPU interpreter (TRITON_INTERPRET=1) at tiny shapes.

The variable must be set before triton is imported, hence here. One interpreter fix is applied: Triton
3.6's interpreter converts scalars with ``int(ndarray)``, which numpy >= 2.4 refuses for the 1-element
arrays it uses (TypeError in any loop with tensor bounds); we make ``__index__`` take the single element.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"


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
