"""``dsaserve generate`` prints what ``LLM.generate`` returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsaserve import SamplingParams
from dsaserve.cli import main
from tests.model._shared import prompt_ids

pytestmark = pytest.mark.timeout(300)

ARCH = "deepseek_v32"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["The capital of France is", "Once upon a time"]


def test_subprocess_prints_llm_text(world):
    path = world.ckpt(ARCH)
    expected = world.arch_llm(ARCH).generate([PROMPTS[0]], SamplingParams(max_tokens=12))[0]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "dsaserve", "generate", "--model", path, "--prompt", PROMPTS[0],
         "--max-tokens", "12", "--indexer-mode", "exact", "--token-ids"],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{expected.text}\ntoken_ids: {expected.token_ids}\n"
    assert len(expected.token_ids) == 12 and expected.text


def test_several_prompts_and_engine_flags(world, capsys):
    """In process: two prompts (headers), chunked prefill flag, sampling flags, logprobs."""
    llm = world.arch_llm(ARCH)
    params = SamplingParams(max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=4, logprobs=2)
    expected = llm.generate(PROMPTS, params)
    rc = main(["generate", "--model", world.ckpt(ARCH), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
               "--max-tokens", "6", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "4",
               "--logprobs", "2", "--chunked-prefill-size", "5", "--indexer-mode", "exact", "--token-ids"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "=== prompt 0 ==="
    assert "=== prompt 1 ===" in lines
    for exp in expected:
        assert f"{exp.text}\ntoken_ids: {exp.token_ids}\nlogprobs:\n" in out
        for tok, lp in zip(exp.token_ids, exp.logprobs):
            assert f"  {tok}: {lp[tok]:.4f}  [" in out


def test_json_output_and_prompt_ids(world, capsys):
    ids = prompt_ids(40)
    expected = world.arch_llm(ARCH).generate([ids], SamplingParams(max_tokens=5, logprobs=1))[0]
    rc = main(["generate", "--model", world.ckpt(ARCH), "--prompt-ids", ",".join(map(str, ids)),
               "--max-tokens", "5", "--logprobs", "1", "--json", "--indexer-mode", "exact"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1
    assert rows[0]["token_ids"] == expected.token_ids
    assert rows[0]["text"] == expected.text
    assert rows[0]["finish_reason"] == "length"
    assert [{int(k): v for k, v in lp.items()} for lp in rows[0]["logprobs"]] == expected.logprobs


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "0"], "top_p"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--indexer-mode", "int4"], "--indexer-mode: invalid choice: 'int4'"),    # argparse knows the choices
    (["--prompt-ids", "5,600"], "outside the vocabulary"),
])
def test_errors_exit_2_with_message(world, capsys, argv, message):
    try:
        rc = main(["generate", "--model", world.ckpt(ARCH), "--prompt", "Hi", "--indexer-mode", "exact", *argv])
    except SystemExit as e:                       # argparse rejects a bad choice itself (exit status 2)
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_prompt_and_model(world, capsys, tmp_path):
    assert main(["generate", "--model", world.ckpt(ARCH)]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "Hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
