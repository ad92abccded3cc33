"""Source check for host syncs on device code paths (reusable: pass any module or function).

``host_sync_calls(obj)`` parses the source of a module or function and lists every call that forces a
device->host sync on CUDA: ``.item()``, ``.tolist()``, ``.cpu()``, ``.nonzero()`` / ``torch.nonzero``,
``torch.bincount`` / ``.bincount()`` (syncs to size its output), ``torch.unique``, ``torch.masked_select``.
Functions named ``*_reference`` are skipped (CPU / checking paths by convention). The AST is used, so
comments, docstrings and strings never match. Complements the GPU check under
``torch.cuda.set_sync_debug_mode("error")`` (benchmarks/gemm.py), which also sees syncs inside torch.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

SYNC_METHODS = frozenset({"item", "tolist", "cpu", "nonzero", "bincount", "unique", "masked_select"})


def host_sync_calls(obj, skip_suffix: str = "_reference") -> list[str]:
    """['file:line: call', ...] for every syncing call in ``obj``'s source outside ``*skip_suffix`` functions."""
    src = textwrap.dedent(inspect.getsource(obj))
    fname = inspect.getsourcefile(obj)
    first = inspect.getsourcelines(obj)[1] if not inspect.ismodule(obj) else 1
    tree = ast.parse(src)
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.endswith(skip_suffix):
            skipped.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr in SYNC_METHODS:
            found.append(f"{fname}:{first + node.lineno - 1}: .{node.func.attr}(")
    return found
