"""The paper's Table 1 at toy scale: bandit, token and segment reward models, PPO against each.

    python benchmarks/toy_ablation.py     # 3 seeds, the ppo defaults; ~25 min on 2 CPU cores
    python benchmarks/toy_ablation.py --seeds 0 --steps 20   # a quick look

Trains the three reward models from the same toy SFT model (entropy cutoff inf, 0 and 1.0), runs
PPO against each with the same budget and seeds, and prints, per variant, the mean over seeds of
the final exact toy score, RM reward and KL, and the steps to reach 90% of the best variant's
improvement over the SFT policy. Writes the table as JSON and a plot of the rollout toy score vs
step (matplotlib).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import segment_rlhf as S  # noqa: E402

VARIANTS = {"bandit": "inf", "token": "0", "segment": "1.0"}


def smooth(xs, k=9):
    """Trailing moving average (the rollout toy score of one batch is noisy)."""
    return [
        sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1])
        for i in range(len(xs))
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=S.PPOArgs.steps)
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args()

    sft = S.toy_sft_model()
    results, curves = {}, {}
    for name, threshold in VARIANTS.items():
        rm = S.main(
            [
                "train-rm",
                "--model",
                sft,
                "--entropy-threshold",
                threshold,
                "--output-dir",
                f"{args.out}/rm-{name}",
                "--overwrite",
            ]
        )
        runs = []
        for seed in args.seeds:
            out_dir = f"{args.out}/ppo-{name}-seed{seed}"
            final = S.main(
                [
                    "ppo",
                    "--reward-model",
                    rm["output_dir"],
                    "--seed",
                    str(seed),
                    "--steps",
                    str(args.steps),
                    "--output-dir",
                    out_dir,
                    "--overwrite",
                ]
            )
            rows = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
            runs.append(
                {
                    **final,
                    "rm_accuracy": rm["eval_accuracy"],
                    "curve": [r["ppo/toy_score"] for r in rows],
                }
            )
        curves[name] = smooth([sum(c) / len(c) for c in zip(*(r["curve"] for r in runs))])

        def mean(key):
            return sum(r[key] for r in runs) / len(runs)

        results[name] = {
            "rm_accuracy": rm["eval_accuracy"],
            "toy_score_before": mean("toy_score_before"),
            "toy_score_after": mean("toy_score_after"),
            "toy_score_after_per_seed": [r["toy_score_after"] for r in runs],
            "flawed_rate_after": mean("flawed_rate_after"),
            "reward_after": mean("reward_after"),
            "kl": mean("kl"),
        }

    start = min(c[0] for c in curves.values())
    best = max(max(c) for c in curves.values())
    for (
        name,
        curve,
    ) in curves.items():  # steps until 90% of the best variant's gain over the start is reached
        hit = [i + 1 for i, x in enumerate(curve) if x >= start + 0.9 * (best - start)]
        results[name]["steps_to_90pct"] = hit[0] if hit else None

    print(
        f"{'variant':8} {'RM acc':>7} {'toy before':>10} {'toy after':>10} {'flawed':>7}"
        f" {'RM reward':>9} {'KL':>6} {'steps to 90%':>12}"
    )
    for name, r in results.items():
        print(
            f"{name:8} {r['rm_accuracy']:7.3f} {r['toy_score_before']:10.3f}"
            f" {r['toy_score_after']:10.3f} "
            f"{r['flawed_rate_after']:7.3f} {r['reward_after']:9.3f} {r['kl']:6.2f}"
            f" {str(r['steps_to_90pct']):>12}"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "toy_ablation.json"), "w") as f:
        json.dump(
            {"seeds": args.seeds, "steps": args.steps, "results": results, "curves": curves},
            f,
            indent=1,
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    for name, curve in curves.items():
        plt.plot(range(1, len(curve) + 1), curve, label=name)
    (
        plt.xlabel("PPO step"),
        plt.ylabel(f"rollout toy score (mean of {len(args.seeds)} seeds, smoothed)"),
    )
    plt.legend(), plt.tight_layout(), plt.savefig(os.path.join(args.out, "toy_ablation.png"))
    print(f"wrote {args.out}/toy_ablation.json and toy_ablation.png")


if __name__ == "__main__":
    main()
