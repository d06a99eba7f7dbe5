"""The paper's Table 1 at toy scale: bandit, token and segment reward models, PPO against each.

    python benchmarks/toy_ablation.py                  # 5 seeds, the defaults; ~1 h on 2 CPU cores
    python benchmarks/toy_ablation.py --seeds 0 1 2 &  # or split the seeds over processes ...
    python benchmarks/toy_ablation.py --seeds 3 4 &
    python benchmarks/toy_ablation.py                  # ... then one run collects the table
    python benchmarks/toy_ablation.py --seeds 0 --steps 20 --out runs/ablation-quick  # a look

For every seed, three reward models are trained from the same toy SFT model with that seed (entropy
cutoff c = inf, 0 and 1.0; the training pairs follow the seed) and PPO runs against each with the
same hyperparameters and seed. The held-out prompts and the pairs of the per-segment accuracy are
the same for every seed and variant. Per variant it reports the final exact toy score on the
held-out prompts (mean and 95% t-interval over seeds), the area under the learning curve (mean
rollout toy score over all steps, per seed, then mean and interval), the steps the mean curve
takes to reach 90% of the best variant's gain, and the reward models' pair and per-segment
accuracy. A run already finished (its result.json exists) is not run again.
Writes OUT/toy_ablation.json and OUT/toy_ablation.png (curves with 95% bands; needs matplotlib).
"""

import argparse
import json
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import segment_rlhf as S  # noqa: E402

VARIANTS = {"bandit": "inf", "token": "0", "segment": "1.0"}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(xs):
    """Mean and half-width of the 95% t-interval over seeds (0 for one seed)."""
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, 0.0
    return mean, T_975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def smooth(xs, k=9):
    """Trailing moving average (the rollout toy score of one batch is noisy)."""
    return [statistics.fmean(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def run_once(out_dir, argv):
    """S.main(argv) unless out_dir/result.json says it already ran; its closing dict."""
    done = os.path.join(out_dir, "result.json")
    if not os.path.exists(done):
        result = S.main([*argv, "--output-dir", out_dir, "--overwrite"])
        with open(done, "w") as f:
            json.dump(result, f)
    return json.load(open(done))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=S.PPOArgs.steps)
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args()

    sft = S.toy_sft_model()
    runs = {name: [] for name in VARIANTS}
    for seed in args.seeds:
        for name, threshold in VARIANTS.items():
            rm_dir = f"{args.out}/rm-{name}-seed{seed}"
            rm = run_once(
                rm_dir,
                ["train-rm", "--model", sft, "--entropy-threshold", threshold, "--seed", str(seed)],
            )
            ppo_dir = f"{args.out}/ppo-{name}-seed{seed}"
            ppo = ["ppo", "--reward-model", rm_dir, "--seed", str(seed), "--steps", str(args.steps)]
            final = run_once(ppo_dir, ppo)
            rows = [json.loads(line) for line in open(os.path.join(ppo_dir, "metrics.jsonl"))]
            curve = [r["ppo/toy_score"] for r in rows]
            runs[name].append({**final, "rm": rm, "curve": curve})

    curves = {
        name: [statistics.fmean(c) for c in zip(*(r["curve"] for r in rs))]
        for name, rs in runs.items()
    }
    smoothed = {name: smooth(c) for name, c in curves.items()}
    start = statistics.fmean(c[0] for c in curves.values())  # the SFT policy, same for all
    best_gain = max(max(c) for c in smoothed.values()) - start
    results = {}
    for name, rs in runs.items():
        after = [r["toy_score_after"] for r in rs]
        auc = [statistics.fmean(r["curve"]) for r in rs]
        hit = [i + 1 for i, x in enumerate(smoothed[name]) if x >= start + 0.9 * best_gain]
        seg_acc = [r["rm"].get("segment_accuracy") for r in rs]
        results[name] = {
            "toy_score_before": statistics.fmean(r["toy_score_before"] for r in rs),
            "toy_score_after": interval(after)[0],
            "toy_score_after_ci95": interval(after)[1],
            "toy_score_after_per_seed": after,
            "auc": interval(auc)[0],
            "auc_ci95": interval(auc)[1],
            "steps_to_90pct": hit[0] if hit else None,
            "rm_accuracy": statistics.fmean(r["rm"]["eval_accuracy"] for r in rs),
            "rm_segment_accuracy": None if None in seg_acc else statistics.fmean(seg_acc),
            "kl": statistics.fmean(r["kl"] for r in rs),
            "flawed_rate_after": statistics.fmean(r["flawed_rate_after"] for r in rs),
        }

    print(
        f"{'variant':8} {'RM acc':>6} {'seg acc':>7} {'before':>6} {'after (95% CI)':>16}"
        f" {'AUC (95% CI)':>16} {'KL':>5} {'steps to 90%':>12}"
    )
    for name, r in results.items():
        seg = "-" if r["rm_segment_accuracy"] is None else f"{r['rm_segment_accuracy']:.3f}"
        print(
            f"{name:8} {r['rm_accuracy']:6.3f} {seg:>7} {r['toy_score_before']:6.3f}"
            f" {r['toy_score_after']:9.3f} ±{r['toy_score_after_ci95']:.3f}"
            f" {r['auc']:9.3f} ±{r['auc_ci95']:.3f} {r['kl']:5.2f} {str(r['steps_to_90pct']):>12}"
        )
    summary = {"seeds": args.seeds, "steps": args.steps, "results": results, "curves": curves}
    with open(os.path.join(args.out, "toy_ablation.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(args.out, runs, len(args.seeds))


def plot(out, runs, n_seeds):
    """Smoothed rollout toy score per step: mean over seeds and its 95% band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, rs in runs.items():
        per_step = list(zip(*(smooth(r["curve"]) for r in rs)))
        mean, half = zip(*(interval(list(xs)) for xs in per_step))
        steps = range(1, len(mean) + 1)
        ax.plot(steps, mean, label=name)
        ax.fill_between(
            steps,
            [m - h for m, h in zip(mean, half)],
            [m + h for m, h in zip(mean, half)],
            alpha=0.2,
        )
    ax.set_xlabel("PPO step")
    ax.set_ylabel("exact toy score of the rollouts")
    ax.set_title(f"mean of {n_seeds} seeds (smoothed over 9 steps), 95% band")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "toy_ablation.png"), dpi=120)
    print(f"wrote {out}/toy_ablation.json and toy_ablation.png")


if __name__ == "__main__":
    main()
