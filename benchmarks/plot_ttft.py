"""Plot TTFT vs input length per PP x CP layout from a ``dsaserve bench prefill --out results.json`` file.

    python3 benchmarks/plot_ttft.py results.json docs/ttft_prefill.png

Left: TTFT per layout (solid) and, dashed, the 1x1 TTFT divided by the layout's GPU count (perfect
scaling). Right: speedup over 1x1 measured in the same run. Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import json
import sys


def plot_results(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r["variant"] == "baseline" and r["status"] == "ok"]
    layouts = list(dict.fromkeys(r["layout"] for r in runs))
    meta = results.get("meta", {})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = {r["input_len"]: r["ttft_median_s"] for r in runs if r["layout"] == "1x1"}
    for lay in layouts:
        pts = sorted((r["input_len"], r["ttft_median_s"]) for r in runs if r["layout"] == lay)
        xs, ys = [p[0] / 1024 for p in pts], [p[1] for p in pts]
        line, = ax.plot(xs, ys, marker="o", label=lay)
        pp, cp = (int(v) for v in lay.split("x"))
        if pp * cp > 1 and base:
            ideal = [(n / 1024, base[n] / (pp * cp)) for n, _ in pts if n in base]
            if ideal:
                ax.plot([p[0] for p in ideal], [p[1] for p in ideal], ls="--", lw=0.8, color=line.get_color())
            sp = [(n / 1024, base[n] / t) for n, t in pts if n in base]
            ax2.plot([p[0] for p in sp], [p[1] for p in sp], marker="o", color=line.get_color(), label=lay)
            ax2.axhline(pp * cp, ls=":", lw=0.6, color=line.get_color())
    ax.set_xlabel("input length (K tokens)")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("TTFT per layout (PPxCP); dashed: 1x1 / GPUs")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2.set_xlabel("input length (K tokens)")
    ax2.set_ylabel("speedup vs 1x1 (same run)")
    ax2.set_title("speedup; dotted: GPU count")
    ax2.grid(alpha=0.3)
    if ax2.lines:
        ax2.legend()
    fig.suptitle(f"dsaserve prefill, {meta.get('card', '?')}, {meta.get('dtype', '')}, chunk {meta.get('chunk_size')}, "
                 f"{meta.get('date', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        results = json.load(f)
    plot_results(results, argv[1])
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
