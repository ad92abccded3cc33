"""A thread simulation of ``dsaserve/kernels/mma_turns.py`` as the two kernels use it, for checking a change to it
on a CPU before a GPU run (Gluon has no CPU interpreter; a wrong turn on the GPU is a hang or, worse, a silent
loss of the order the turns exist for).

Each consumer warpgroup is a thread that walks its kernel's schedule: ``moe`` (``moe_gemm_hopper``: per ring step
one or two MMAs in each consumer, consumer 1's rows sometimes all past the expert's end, so it passes its turns
without an MMA) and ``logits`` (``indexer_logits_hopper``: per query block n_t key tiles dealt alternately, blocks
of odd, even and zero tile counts, consumer 1 passing one turn after an odd block). The barrier is an mbarrier
with PTX's parity-only wait. A warpgroup's one-thread arrive lands late by a random delay unless the thread
barrier before the next wait is modelled (``take_turn``), since the other warps may race to the wait. Checks: the
MMAs are issued in the schedule's order, and nothing deadlocks (5 s timeout a wait).

    python benchmarks/turns_protocol_sim.py [TRIALS]        # prints "ok"
    python benchmarks/turns_protocol_sim.py 50 --mutate M    # a broken variant, expected to fail (see MUTATIONS)
"""
import random
import sys
import threading
import time

MUTATIONS = {
    "none": "the protocol as written",
    "no_thread_barrier": "take_turn without its thread barrier: the own previous arrive may land after the test",
    "tile_order_numbers": "logits issues numbered by ring position (it + j) instead of 2 * turns + PART",
    "no_dummy_turn": "logits: consumer 1 does not pass a turn after a block of odd tile count",
    "idle_skips_turns": "moe: an idle consumer 1 takes no turns",
    "parity_flipped": "take_turn waits with the parity g & 1",
}


class MBar:
    """mbarrier of arrive count 1 with parity waits: wait(p) passes while the current phase's parity != p."""

    def __init__(self):
        self.done = 0
        self.cv = threading.Condition()

    def arrive(self):
        with self.cv:
            self.done += 1
            self.cv.notify_all()

    def wait(self, parity, who):
        with self.cv:
            while (self.done & 1) == parity:
                if not self.cv.wait(timeout=5):
                    raise RuntimeError(f"deadlock: {who} waits for parity {parity}, {self.done} phases done")


def jitter(p=0.3, scale=2e-4):
    if random.random() < p:
        time.sleep(random.random() * scale)


def moe_schedule(rng):
    """-> per consumer, a list of (issue number, MMA label or None) in program order, and the expected MMA order."""
    nmma = rng.choice([1, 2])
    steps = []  # (item, step, consumer 1 idle)
    for item in range(rng.randint(1, 5)):
        idle = rng.random() < 0.4
        steps += [(item, k, idle) for k in range(rng.randint(1, 6))]
    per = {0: [], 1: []}
    order = []
    for it, (item, k, idle) in enumerate(steps):
        for i in range(nmma):
            for part in (0, 1):
                label = None if (part == 1 and idle) else (item, k, i, part)
                per[part].append((2 * (nmma * it + i) + part, label))
                if label is not None:
                    order.append(label)
    return per, order


def logits_schedule(rng, mutate):
    """Blocks of n_t tiles, tile j to consumer j % 2, each consumer counting its turns."""
    per = {0: [], 1: []}
    order = []
    turns = {0: 0, 1: 0}
    it = 0
    for blk in range(rng.randint(1, 7)):
        n_t = rng.choice([0, 1, 2, 3, 4, 5])
        for j in range(n_t):
            part = j % 2
            g = it + j if mutate == "tile_order_numbers" else 2 * turns[part] + part
            per[part].append((g, (blk, j)))
            turns[part] += 1
            order.append((blk, j))
        if n_t % 2 == 1 and mutate not in ("no_dummy_turn", "tile_order_numbers"):
            per[1].append((2 * turns[1] + 1, None))
            turns[1] += 1
        it += n_t
    return per, order


def run(kind, seed, mutate="none"):
    rng = random.Random(seed)
    if kind == "moe":
        per, order = moe_schedule(rng)
        if mutate == "idle_skips_turns":
            per[1] = [(g, lab) for g, lab in per[1] if lab is not None]
    else:
        per, order = logits_schedule(rng, mutate)
    bar = MBar()
    issued = []
    lock = threading.Lock()
    errors = []

    def consumer(part):
        pending = None  # this warpgroup's arrive that has not landed yet (the racing warps' view)
        try:
            for g, label in per[part]:
                jitter()
                if mutate == "no_thread_barrier":
                    if pending is not None and random.random() < 0.5:
                        pending.join()  # sometimes it lands in time, sometimes not
                elif pending is not None:
                    pending.join()  # the thread barrier: the own arrive has landed
                parity = (g & 1) if mutate == "parity_flipped" else (g & 1) ^ 1
                bar.wait(parity, f"consumer {part} at issue {g}")
                if label is not None:
                    with lock:
                        issued.append(label)
                jitter(0.2, 5e-5)
                pending = threading.Thread(target=lambda: (jitter(0.5, 1e-4), bar.arrive()))
                pending.start()
            if pending is not None:
                pending.join()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=consumer, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if issued != order:
        first = next(i for i, (a, b) in enumerate(zip(issued, order)) if a != b)
        raise AssertionError(f"{kind}: MMA {first} issued as {issued[first]}, the schedule has {order[first]}")


def main():
    args = sys.argv[1:]
    mutate = "none"
    if "--mutate" in args:
        i = args.index("--mutate")
        mutate = args[i + 1]
        del args[i:i + 2]
        assert mutate in MUTATIONS, f"--mutate: one of {sorted(MUTATIONS)}"
    trials = int(args[0]) if args else 40
    for seed in range(trials):
        for kind in ("moe", "logits"):
            run(kind, seed, mutate)
    print("ok")


if __name__ == "__main__":
    main()
