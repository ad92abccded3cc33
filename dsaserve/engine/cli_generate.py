"""``dsaserve generate``: offline completions from the command line.

    dsaserve generate --model DIR --prompt "Once upon a time" [--prompt ...] [--max-tokens 32]
                      [--temperature T] [--top-p P] [--top-k K] [--seed S] [--logprobs K] [--token-ids]
                      [--pp-size 2 --cp-size 2 ...every engine flag]

Prints each completion's text (one block per prompt; a ``=== prompt i ===`` header when there are several;
control characters escaped, e.g. ``\x00``; a note on stderr when the weights are random).
``--token-ids`` adds the generated ids, ``--logprobs K`` the top-K logprobs of every generated token, and
``--json`` prints one JSON object per prompt instead (text, token_ids, finish_reason, logprobs).
``--prompt-ids 1,2,3`` passes token ids directly (for checkpoints without a tokenizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import unicodedata

from dsaserve.args import EngineArgs
from dsaserve.checkpoint.tiny import MARKER_FILE


def _token_id_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids takes comma-separated integers, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty: give at least one token id")
    return ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (HF format: config.json + safetensors)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="prompt text; repeat for several prompts (run as one batch)")
    parser.add_argument("--prompt-ids", action="append", default=[], type=_token_id_list, metavar="IDS",
                        help="a prompt as comma-separated token ids; repeatable, runs after the --prompt texts")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per prompt (default: 16)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)")
    sampling.add_argument("--top-k", type=int, default=-1, help="keep the K most likely tokens; -1 = off")
    sampling.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    sampling.add_argument("--logprobs", type=int, default=None, metavar="K",
                          help="print the top-K logprobs of each generated token")
    sampling.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    out = parser.add_argument_group("output")
    out.add_argument("--token-ids", action="store_true", help="also print the generated token ids")
    out.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    EngineArgs.add_cli_args(parser)


def printable(text: str) -> str:
    """Text for a terminal: control characters (other than newline and tab) shown as escapes such as
    ``\\x00``, so a model's stray NUL or ESC bytes cannot garble or drive the terminal."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else c.encode("unicode_escape").decode()
                   for c in text)


def random_weights_note(model: str, load_format: str) -> str | None:
    """A one-line warning when the weights are random (their text means nothing), else None."""
    if load_format == "random":
        return "note: --load-format random: the weights are random, so the generated text is meaningless"
    if os.path.isfile(os.path.join(model, MARKER_FILE)):
        return (f"note: {model} is a tiny test checkpoint with random weights (dsaserve make-tiny): the generated "
                "text is meaningless")
    return None


def _print_plain(outputs, show_ids: bool, show_logprobs: bool) -> None:
    several = len(outputs) > 1
    for i, out in enumerate(outputs):
        if several:
            print(f"=== prompt {i} ===")
        print(printable(out.text))
        if show_ids:
            print(f"token_ids: {out.token_ids}")
        if show_logprobs and out.logprobs is not None:
            print("logprobs:")
            for tok, lp in zip(out.token_ids, out.logprobs):
                top = ", ".join(f"{t}: {v:.4f}" for t, v in sorted(lp.items(), key=lambda kv: -kv[1]))
                print(f"  {tok}: {lp[tok]:.4f}  [{top}]")


def run(args: argparse.Namespace) -> int:
    from dsaserve.engine.llm import LLM
    from dsaserve.engine.types import SamplingParams
    from dsaserve.checkpoint.loader import CheckpointError
    from dsaserve.config import ConfigError
    from dsaserve.parallel.launch import run_worker_if_torchrun

    if run_worker_if_torchrun(args.model, EngineArgs.from_cli(args)):
        return 0                                   # a torchrun rank > 0: served rank 0's plans until shutdown
    prompts: list = list(args.prompt) + list(args.prompt_ids)
    if not prompts:
        print("error: give at least one --prompt TEXT (or --prompt-ids 1,2,3)", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, logprobs=args.logprobs,
                                ignore_eos=args.ignore_eos)
        engine_args = EngineArgs.from_cli(args)
        engine_args.validate()
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        llm = LLM(args.model, **dataclasses.asdict(engine_args))
    except (ValueError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        outputs = llm.generate(prompts, params)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        llm.shutdown()
    note = random_weights_note(args.model, engine_args.load_format)
    if note:
        print(note, file=sys.stderr)
    if args.json:
        for out in outputs:
            logprobs = None if out.logprobs is None else [{str(k): v for k, v in lp.items()} for lp in out.logprobs]
            print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                              "logprobs": logprobs}))
    else:
        _print_plain(outputs, args.token_ids, args.logprobs is not None)
    return 0
