"""The user-facing entry points of the runtime: ``dsaserve demo`` and ``torchrun`` launches of ``dsaserve
generate`` on two agents standing for two nodes (the multi-node path, env:// rendezvous) agree with one
process; nodes started with different layouts fail at once; a dead agent stops the world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dsaserve.cli import main as cli_main
from tests.parallel._util import LOGPROB_TOL, free_port, prompt_ids
from dsaserve.server.cli import _descendants
from tests.parallel.conftest import venv_bin, wait_all_gone

pytestmark = pytest.mark.timeout(300)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo(pool):
    """The README's first command, as a user runs it (tiny checkpoint built into the user cache, or reused)."""
    pool.shutdown()                         # free the cores: the demo spawns 4 processes of its own
    proc = subprocess.run([sys.executable, "-m", "dsaserve", "demo", "--prompt-len", "600", "--max-tokens", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "identical : True" in out, out
    assert "OK: PP x CP output equals the single-process output" in out
    # the bytes table: each stage-0 rank sent exactly half of the gather-then-send volume
    rows = [line.split() for line in out.splitlines() if line.strip().endswith("0.500")]
    assert len(rows) == 2 and {r[0] for r in rows} == {"0", "1"}, out
    assert all(int(r[3].replace(",", "")) == 600 // 2 * 128 * 2 * 4 for r in rows), out


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def torchrun_nodes(nnodes: int, nproc: int, args: list[str], **popen) -> list[subprocess.Popen]:
    """``nnodes`` torchrun agents on this machine, as if on ``nnodes`` nodes (static rendezvous on
    127.0.0.1): node 0's agent hosts the store, node n runs ranks n*nproc .. n*nproc+nproc-1."""
    port = free_port()
    return [subprocess.Popen([venv_bin("torchrun"), "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
                              "--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port),
                              "-m", "dsaserve", *args], cwd=REPO, **popen)
            for n in range(nnodes)]


@pytest.mark.parametrize("nproc, layout", [(2, ["--pp-size", "2", "--cp-size", "2"]), (1, ["--cp-size", "2"])],
                         ids=["pp2xcp2-pp-across-nodes", "cp2-across-nodes"])
def test_two_torchrun_agents_match_single_process_cli(ds_ckpt, pool, capsys, nproc, layout):
    """Issue 14 item 10: two torchrun agents on localhost stand for two nodes (env:// rendezvous through
    node 0's agent store): PP2 x CP2 with the pipeline boundary between the nodes, and one CP group spanning
    both; ``generate`` equals the single-process CLI."""
    pool.shutdown()
    prompts = [",".join(map(str, prompt_ids(n))) for n in (45, 3)]
    args = ["generate", "--model", ds_ckpt, "--max-tokens", "4", "--ignore-eos", "--logprobs", "5", "--json",
            "--kv-cache-tokens", "4096", "--max-model-len", "2048"]
    for p in prompts:
        args += ["--prompt-ids", p]
    nodes = torchrun_nodes(2, nproc, [*args, *layout], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [n.communicate(timeout=240) for n in nodes]
    for n, (out, err) in zip(nodes, outs):
        assert n.returncode == 0, out[-3000:] + err[-3000:]
    par = _json_lines(outs[0][0])                                # rank 0 lives on node 0

    assert cli_main(args) == 0                                   # the single-process CLI, in this process
    ref = _json_lines(capsys.readouterr().out)
    assert len(par) == len(ref) == 2, outs[0][0]
    for p, r in zip(par, ref):
        assert p["token_ids"] == r["token_ids"] and p["text"] == r["text"], (p, r)
        for lp, lr in zip(p["logprobs"], r["logprobs"]):
            assert lp.keys() == lr.keys()
            assert max(abs(lp[k] - lr[k]) for k in lr) < LOGPROB_TOL


def test_nodes_with_different_layouts_fail_in_seconds(ds_ckpt, pool):
    """Issue 14 item 9: node 0 started with --pp-size 2, node 1 with --cp-size 2 (same world size): before,
    both hung in the group set-up and failed with DistStoreError / Gloo connectFullMesh; now every rank
    stops at start-up with one message naming each difference."""
    pool.shutdown()
    args = ["generate", "--model", ds_ckpt, "--prompt-ids", "5,6,7", "--max-tokens", "1", "--comm-timeout-s", "60"]
    port = free_port()
    nodes = [subprocess.Popen([venv_bin("torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(n),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "dsaserve", *args,
                               *layout], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, layout in enumerate((["--pp-size", "2"], ["--cp-size", "2"]))]
    t0 = time.monotonic()
    outs = [n.communicate(timeout=120) for n in nodes]
    took = time.monotonic() - t0
    assert all(n.returncode != 0 for n in nodes), outs
    # rank 0 (node 0) prints one line, no traceback; rank 1 (node 1) got the same verdict
    err0, err1 = outs[0][1], outs[1][1]
    for err in (err0, err1):
        assert "pp_size 1 vs 2" in err and "cp_size 2 vs 1" in err and "rank 1 (host" in err, err[-3000:]
    assert "error: the ranks were not started with the same settings" in err0, err0[-3000:]
    # no dsaserve traceback (torchrun's own agent traceback lives in site-packages, which may sit under REPO/.venv)
    pkg = os.path.join(REPO, "dsaserve")
    assert f'File "{pkg}' not in err0 and "DistStoreError" not in err0 + err1, err0[-3000:]
    assert took < 60, f"took {took:.0f} s (torch start-up included)"


def test_dead_agent_stops_the_world(ds_ckpt, pool):
    """Issue 14 items 8 and 10: SIGKILL node 1's torchrun agent while rank 0 (node 0) serves a stream. Before,
    node 1's worker was re-parented to PID 1 and kept serving; now it dies with its agent, rank 0 reports
    the lost rank to the client and exits non-zero, and node 0's agent ends."""
    import httpx

    pool.shutdown()
    port = free_port()
    nodes = torchrun_nodes(2, 1, ["serve", "--model", ds_ckpt, "--pp-size", "2", "--port", str(port),
                                  "--max-model-len", "2048", "--kv-cache-tokens", "4096", "--heartbeat-timeout-s", "3",
                                  "--fault-exit-delay", "1", "--log-level", "warning"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert all(n.poll() is None for n in nodes), "an agent exited during start-up"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.3)
        node1_workers = _descendants(nodes[1].pid)
        assert node1_workers, "node 1's agent has no worker"
        events: list[str] = []
        with httpx.stream("POST", base + "/v1/completions", timeout=60,
                          json={"model": os.path.basename(ds_ckpt), "prompt": [5, 6, 7], "max_tokens": 1500,
                                "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 3:
                    nodes[1].kill()                                    # SIGKILL the agent: no clean-up
                    t_kill = time.monotonic()
            # the rest of the stream: it must end with an error event, not go on
        took = time.monotonic() - t_kill
        assert events[-1].startswith("{") and '"error"' in events[-1], events[-3:]
        assert "rank 1 (host" in events[-1] and "stopped sending heartbeats" in events[-1], events[-1]
        assert took < 30, f"the stream ended {took:.0f} s after the agent died"
        assert not wait_all_gone(node1_workers, timeout_s=10), "node 1's worker outlived its agent"
        assert nodes[0].wait(timeout=60) != 0                          # node 0's agent ends, with an error
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
            n.communicate(timeout=30)
