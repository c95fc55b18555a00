"""BENCHMARKS.md's figures as one plot: vlmkit vs the peer on one H200, and ZeRO-2 scaling per GPU.

    python3 benchmarks/plot_results.py                      # benchmarks/results.csv -> docs/benchmarks.png

results.csv holds the measured figures of BENCHMARKS.md (each row: the section, the configuration, the
GPU count, the peer's and vlmkit's samples/s from the same device call, the issue's target). The left
panel shows vlmkit / peer samples/s per configuration (light: eager through vlmkit.train.run; dark: the recipe
with the shipped config's settings) against its target; the right one, when scaling rows exist, the per-GPU
samples/s at N GPUs over the 1-GPU figure.
"""
import argparse
import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("peer_samples_s", "vlmkit_samples_s", "target"):
            r[k] = float(r[k]) if r[k] else None
        r["gpus"] = int(r["gpus"])
    return rows


def plot(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in rows if r["section"] == "speed"]
    scaling = [r for r in rows if r["section"] == "scaling"]
    if scaling:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [2.2, 1]})
    else:  # no multi-GPU rows measured on the real path yet
        fig, a = plt.subplots(1, 1, figsize=(10, 4.2))

    ratios = [r["vlmkit_samples_s"] / r["peer_samples_s"] for r in speed]
    colors = ["#9ecae1" if "eager" in r["config"] else "#1f77b4" for r in speed]
    y = range(len(speed))
    a.barh(y, ratios, color=colors)
    for i, (r, q) in enumerate(zip(speed, ratios)):
        a.text(q + 0.03, i, f"{q:.2f}x  ({r['vlmkit_samples_s']:g} vs {r['peer_samples_s']:g} samples/s)",
               va="center", fontsize=8)
        a.plot([r["target"]] * 2, [i - 0.42, i + 0.42], color="#d62728", lw=2)
    a.axvline(1.0, color="grey", lw=0.8, ls=":")
    a.set_yticks(list(y), [r["config"] for r in speed], fontsize=9)
    a.invert_yaxis()
    a.set_xlim(0, max(ratios + [r["target"] for r in speed]) * 1.55)
    a.set_xlabel("vlmkit samples/s / transformers' Llava samples/s (same call, same batch)")
    a.set_title("Training throughput, one H200 (red: target)", fontsize=10)

    if scaling:
        scaling_panel(b, scaling)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def scaling_panel(b, scaling):
    base = {r["config"]: r["vlmkit_samples_s"] for r in scaling if r["gpus"] == 1}
    gpus = [r["gpus"] for r in scaling]
    eff = [r["vlmkit_samples_s"] / base[r["config"]] for r in scaling]
    b.bar([str(g) for g in gpus], eff, color="#2ca02c")
    for i, (r, e) in enumerate(zip(scaling, eff)):
        b.text(i, e + 0.02, f"{e:.2f}\n{r['vlmkit_samples_s']:g}/GPU", ha="center", fontsize=8)
    b.axhline(scaling[0]["target"], color="#d62728", lw=2, label=f"target {scaling[0]['target']:g}")
    b.set_ylim(0, 1.3)
    b.set_xlabel("H200 GPUs")
    b.set_ylabel("samples/s per GPU / 1-GPU samples/s")
    b.set_title(f"{scaling[0]['config']}: scaling", fontsize=10)
    b.legend(loc="lower right", fontsize=8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results.csv"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.png"))
    args = ap.parse_args(argv)
    print(plot(read(args.results), args.out))


if __name__ == "__main__":
    main()
