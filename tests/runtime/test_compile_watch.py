"""The Triton compile watch: compiles timed, the ones after the warm-up logged and counted (the "warm"
control op on every rank: tests/parallel/test_control_warm.py)."""

from __future__ import annotations

import logging

from dsaserve.runtime.compile_watch import ENV, CompileWatch, install, install_if_asked


def _compile(watch: CompileWatch, name: str, spec: str) -> None:
    """What Triton does around one compile: the cache hook, then the post-compile hook, same keywords."""
    kw = dict(key=("k",), repr=f"{name}[num_warps=4]({spec})", fn=type("Info", (), {"name": name})(),
              compile={}, is_manual_warmup=False, already_compiled=False)
    assert watch.before(**kw) is None                  # None: Triton goes on and compiles
    assert watch.after(**kw) is None


def test_compiles_after_the_warmup_are_logged_and_counted(caplog):
    watch = CompileWatch()
    with caplog.at_level(logging.DEBUG, logger="dsaserve.runtime.compile_watch"):
        _compile(watch, "_a_kernel", "S: i32D")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]   # warm-up compiles: quiet
        watch.mark_warm()
        _compile(watch, "_b_kernel", "S: i32")
    snap = watch.snapshot()
    assert snap["compiles"] == 2 and snap["warm"] and snap["after_warmup"] == 1 and snap["seconds"] >= 0
    assert [c["kernel"] for c in snap["recent_after_warmup"]] == ["_b_kernel"]
    assert "S: i32" in snap["recent_after_warmup"][0]["specialization"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "_b_kernel" in warned[0] and "warm-up did not cover" in warned[0]
    for i in range(30):                                # only the most recent are kept
        _compile(watch, f"_k{i}", "")
    assert watch.snapshot()["after_warmup"] == 31 and len(watch.snapshot()["recent_after_warmup"]) == 20


def test_install_keeps_someone_elses_hooks():
    from triton import knobs

    rt = knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    try:
        rt.jit_cache_hook, rt.jit_post_compile_hook = None, None
        mine = CompileWatch()
        assert install(mine) and rt.jit_cache_hook == mine.before and rt.jit_post_compile_hook == mine.after
        assert install(mine)                            # again: still ours
        assert not install(CompileWatch())              # another watch does not replace it
        other = lambda **kw: None                       # noqa: E731
        rt.jit_cache_hook, rt.jit_post_compile_hook = other, None
        assert not install(CompileWatch()) and rt.jit_cache_hook is other
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved



def test_installed_only_when_asked(monkeypatch):
    from triton import knobs

    rt = knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    try:
        rt.jit_cache_hook, rt.jit_post_compile_hook = None, None
        monkeypatch.delenv(ENV, raising=False)
        assert not install_if_asked(CompileWatch()) and rt.jit_cache_hook is None
        monkeypatch.setenv(ENV, "1")
        watch = CompileWatch()
        assert install_if_asked(watch) and rt.jit_post_compile_hook == watch.after
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved
