"""A user script with no ``if __name__ == "__main__":`` guard can start a PP x CP engine: spawned workers
must not re-run the script (multiprocessing's spawn would re-import it in every child)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from dsaserve import SamplingParams

from ._util import LLM_DEFAULTS, prompt_ids

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_unguarded_script_runs_pp_x_cp(ds_ckpt, ds_ref, tmp_path):
    prompt = prompt_ids(37)
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        from dsaserve import LLM, SamplingParams
        print("script body ran", flush=True)           # must print once: children never re-run it
        llm = LLM({ds_ckpt!r}, pp_size=2, cp_size=1, **{LLM_DEFAULTS!r})
        out = llm.generate([{prompt!r}], SamplingParams(max_tokens=4, ignore_eos=True))[0]
        print("TOKENS", out.token_ids, flush=True)
        llm.shutdown()
    """))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("script body ran") == 1, proc.stdout
    ref = ds_ref.outputs([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert f"TOKENS {ref.token_ids}" in proc.stdout, proc.stdout
