"""``dsaserve generate`` prints what ``LLM.generate`` returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsaserve import SamplingParams
from dsaserve.cli import main
from dsaserve.engine.cli_generate import printable
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
    assert proc.stdout == f"{printable(expected.text)}\ntoken_ids: {expected.token_ids}\n"
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
        assert f"{printable(exp.text)}\ntoken_ids: {exp.token_ids}\nlogprobs:\n" in out
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


# ---- issue 14 items 15, 17, 18 ---------------------------------------------------------------------------
def test_device_cuda_without_cuda_is_one_line(world, capsys):
    """Before: a 31-line traceback from deep inside torch; now one line naming the fix, for generate and serve."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for sub in (["generate", "--prompt", "Hi"], ["serve", "--port", "1"]):
        rc = main([sub[0], "--model", world.ckpt(ARCH), *sub[1:], "--device", "cuda"])
        err = capsys.readouterr().err
        assert rc == 2, (sub, err)
        assert err.count("\n") == 1 and "no CUDA support" in err and "--device cpu" in err, err


def test_vocabulary_rule_is_the_model_s(world, capsys):
    """One rule (the model's vocabulary, 512 ids) for the CLI and the server (tests/server/test_real_engine.py):
    id 500 is a valid prompt id and decodes to text; 512 is not."""
    assert main(["generate", "--model", world.ckpt(ARCH), "--prompt-ids", "5,500", "--max-tokens", "1",
                 "--indexer-mode", "exact"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", world.ckpt(ARCH), "--prompt-ids", "5,512", "--indexer-mode", "exact"]) == 2
    assert "token id 512 is outside the vocabulary [0, 512)" in capsys.readouterr().err


def test_plain_output_escapes_control_characters_and_notes_random_weights(world, capsys, monkeypatch):
    from dsaserve.engine import cli_generate

    assert cli_generate.printable("a\x00b\x1b[31mc\x7f\nd\te é 🦊‍🔥") == "a\\x00b\\x1b[31mc\\x7f\nd\te é 🦊‍🔥"
    from dsaserve.engine import llm as llm_mod      # run() imports LLM from here
    from dsaserve.engine.types import CompletionOutput

    monkeypatch.setattr(llm_mod.LLM, "generate", lambda self, prompts, params: [
        CompletionOutput([5], [6, 7], "bell\x07 nul\x00 end") for _ in prompts])
    assert main(["generate", "--model", world.ckpt(ARCH), "--prompt", "a", "--prompt", "b"]) == 0
    out, err = capsys.readouterr()
    assert "bell\\x07 nul\\x00 end" in out and "\x00" not in out and "\x07" not in out
    assert err.count("random weights") == 1 and "meaningless" in err, err
