"""The paper's Table 1 at toy scale, across answer length: bandit, token and segment rewards.

    python benchmarks/toy_ablation.py                          # all lengths, 5 seeds: CPU hours
    OMP_NUM_THREADS=1 python benchmarks/toy_ablation.py --lengths long --seeds 0 1 2 &  # or split
    OMP_NUM_THREADS=1 python benchmarks/toy_ablation.py --lengths long --seeds 3 4 &    # the runs
    python benchmarks/toy_ablation.py --report                 # the table and plot of what is done
    python benchmarks/toy_ablation.py --lengths short --seeds 0 --steps 20 --out runs/abl-quick
    python benchmarks/toy_ablation.py --search end-penalty-mean --lengths long --seeds 0  # arm
    python benchmarks/toy_ablation.py --samples --lengths long --seeds 0  # what the policies say

Answer length is the toy's --toy-lists: `short` one list per answer (the quick start's task, ~17
response tokens), `medium` three (~51), `long` eight (~135). Per length one SFT model (seed 0; 12
epochs for the longer answers, 6 for the short) is trained; for every seed three reward models are
trained from it with that seed (entropy cutoff c = inf, 0 and 1.0; the training pairs follow the
seed) and PPO runs against each with the same hyperparameters and seed. The held-out prompts, and
the pairs of the per-segment accuracy, are fixed per length: the same for every seed and variant.

Each finished (length, variant, seed) leaves a small record in benchmarks/results/toy_ablation/
(committed: runs resume across machines and sessions; a record present is not run again). Per
length and variant the report gives the final exact toy score on the held-out prompts (mean and 95%
t-interval over seeds), the area under the learning curve (mean rollout toy score over the steps),
the steps the mean curve takes to reach 90% of the best variant's gain, the KL, the reward models'
pair and per-segment accuracy and the critic's explained variance (mean over the last 20 steps).
Writes OUT/toy_ablation.json (lengths[name] = response_tokens, results, curves) and
OUT/toy_ablation.png (final score against answer length; curves at the longest length).
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
LENGTHS = {  # --toy-lists, and room for its prompts (<= 39 tokens) and answers (<= 156)
    "short": ["--toy-lists", "1"],  # the defaults: --max-len 64, --max-prompt-len 32
    "medium": ["--toy-lists", "3", "--max-len", "104", "--max-prompt-len", "24"],
    "long": ["--toy-lists", "8", "--max-len", "224", "--max-prompt-len", "48"],
}
NEW_TOKENS = {"short": "24", "medium": "80", "long": "176"}  # ppo's --max-new-tokens
SFT_EPOCHS = {"short": "6", "medium": "12", "long": "12"}  # 6 left long answers malformed
# The settings every record was made with, pinned: a change of the quick start's defaults (tuned
# for its margin: docs/toy.md) does not move the ablation; a run of other --steps leaves no record.
STEPS = 120
RM = ["--epochs", "5", "--lr", "3e-4"]
PPO = ["--lr", "3e-5", "--ppo-epochs", "2", "--mini-batch-size", "16", "--beta", "0.3"]
# At the long length the dense runs of seed 0 were hacked at these settings: segment stopped
# ending its answers from iteration 55 on, token kept ending them but spent 25x the bandit's KL.
# The search: the pinned settings and two arms, for all three variants at once, on seed 0. Both
# arms add the authors' end penalty (their segment run: -0.05 at every token of an unended
# answer); one a KL coefficient 3x as strong, the other --segment-mean (the rewards of an answer
# sum to their mean, as the reward model's score does: token's answers had grown a ninth list,
# every item of it paid). The rule, fixed before the runs: the setting whose training rollouts
# score highest (last 20 iterations, mean over the three variants) is the one every seed of
# that length runs, CHOSEN; the records of the others lie under results/toy_ablation/search/.
SEARCH = {
    "pinned": [],
    "end-penalty-beta1": ["--end-penalty", "-0.05", "--beta", "1.0"],
    "end-penalty-mean": ["--end-penalty", "-0.05", "--segment-mean"],
}
# What each length runs, by the rule (docs/toy.md: the search tables).
CHOSEN = {"short": "pinned", "medium": "end-penalty-beta1", "long": "end-penalty-beta1"}
RECORDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "toy_ablation")
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
    """S.main(argv) into out_dir unless it finished there before; its closing dict. A reward
    model or PPO run checkpoints as it goes and, stopped, continues from there the next time."""
    done = os.path.join(out_dir, "result.json")
    if os.path.exists(done):
        return json.load(open(done))
    if argv[0] == "sft":
        return S.main([*argv, "--output-dir", out_dir, "--overwrite"])
    every = "21" if argv[0] == "train-rm" else "10"  # a third of an RM epoch; 10 PPO iterations
    return S.main([*argv, "--output-dir", out_dir, "--resume", "--save-every", every])


def run_one(args, length, name, seed):
    """One (length, variant, seed): its record, made now unless it is there."""
    record = record_path(args, length, name, seed)
    if os.path.exists(record):
        return json.load(open(record))
    out, shape = f"{args.out}/{length}", LENGTHS[length]
    sft = run_once(f"{out}/sft", ["sft", *shape, "--epochs", SFT_EPOCHS[length]])["output_dir"]
    rm_dir = f"{out}/rm-{name}-seed{seed}"
    rm_args = ["train-rm", "--model", sft, "--entropy-threshold", VARIANTS[name], *shape, *RM]
    rm = run_once(rm_dir, [*rm_args, "--seed", str(seed)])
    if args.rm_only:
        return None
    ppo_dir = ppo_path(args, length, name, seed)
    ppo_args = ["ppo", "--reward-model", rm_dir, "--seed", str(seed), "--steps", str(args.steps)]
    ppo_args += PPO + SEARCH[arm_of(args, length)]
    ppo = run_once(ppo_dir, [*ppo_args, *shape, "--max-new-tokens", NEW_TOKENS[length]])
    rows = [json.loads(line) for line in open(os.path.join(ppo_dir, "metrics.jsonl"))]
    rows = [r for r in rows if "ppo/toy_score" in r]
    keep = ("toy_score", "explained_variance", "response_length", "kl")
    settings = json.load(open(os.path.join(ppo_dir, "args.json")))
    rec = {
        "ppo_settings": {k: v for k, v in settings.items() if k not in ("inputs", "output_dir")},
        "rm": {k: rm.get(k) for k in ("eval_accuracy", "segment_accuracy")},
        "ppo": {k: v for k, v in ppo.items() if k != "output_dir"},
        "curves": {k: [round(r[f"ppo/{k}"], 4) for r in rows] for k in keep},
    }
    if args.steps == STEPS:
        os.makedirs(os.path.dirname(record), exist_ok=True)
        with open(record + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(record + ".tmp", record)
    return rec


def arm_of(args, length):
    """The SEARCH arm this run uses: --search, else the one CHOSEN for the length."""
    return args.search or CHOSEN[length]


def record_path(args, length, name, seed):
    """The chosen arm's records lie in RECORDS/length, the other arms' in RECORDS/search/arm."""
    arm = arm_of(args, length)
    where = [length] if arm == CHOSEN[length] else ["search", arm, length]
    return os.path.join(RECORDS, *where, f"{name}-seed{seed}.json")


def ppo_path(args, length, name, seed):
    arm = arm_of(args, length)
    return f"{args.out}/{length}/ppo-{name}-seed{seed}" + ("" if arm == "pinned" else f"-{arm}")


def show_samples(args, n=2):
    """What the trained policies say: an answer to each of the first n held-out prompts from
    every finished PPO run there (sampled as in training), with its exact score. A reward that
    was hacked shows in the text (an extra list, an answer that never ends)."""
    import torch

    for length in args.lengths:
        prompts = S.toy_prompt_rows(n, seed=-1, lists=int(LENGTHS[length][1]))
        for seed, name in ((seed, name) for seed in args.seeds for name in VARIANTS):
            path = ppo_path(args, length, name, seed)
            if not os.path.isfile(os.path.join(path, "result.json")):
                continue
            tokenizer, policy = S.load_tokenizer(path), S.load_model(path).eval()
            torch.manual_seed(seed)
            for row in prompts:
                turn = [{"role": "user", "content": row["prompt"]}]
                ids = tokenizer.apply_chat_template(
                    turn, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
                new = int(NEW_TOKENS[length])
                out = policy.generate(**ids, do_sample=True, top_k=0, max_new_tokens=new)
                text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
                score = S.toy_score(row["prompt"], text.removesuffix(tokenizer.eos_token))
                print(
                    f"{length} {name} seed {seed}, score {score:.3f}: {row['prompt']}\n  {text!r}"
                )


def summarize(runs):
    """Per variant of one length: the figures of the table, from the seeds' records."""
    curves = {
        name: [statistics.fmean(c) for c in zip(*(r["curves"]["toy_score"] for r in rs))]
        for name, rs in runs.items()
    }
    smoothed = {name: smooth(c) for name, c in curves.items()}
    start = statistics.fmean(c[0] for c in curves.values())  # the SFT policy, same for all
    best_gain = max(max(c) for c in smoothed.values()) - start
    results = {}
    for name, rs in runs.items():
        after = [r["ppo"]["toy_score_after"] for r in rs]
        auc = [statistics.fmean(r["curves"]["toy_score"]) for r in rs]
        hit = [i + 1 for i, x in enumerate(smoothed[name]) if x >= start + 0.9 * best_gain]
        seg_acc = [r["rm"]["segment_accuracy"] for r in rs]
        ev = [statistics.fmean(r["curves"]["explained_variance"][-20:]) for r in rs]
        results[name] = {
            "seeds": len(rs),
            "toy_score_before": statistics.fmean(r["ppo"]["toy_score_before"] for r in rs),
            "toy_score_after": interval(after)[0],
            "toy_score_after_ci95": interval(after)[1],
            "toy_score_after_per_seed": after,
            "auc": interval(auc)[0],
            "auc_ci95": interval(auc)[1],
            # the search's rule reads this: the training rollouts, never the held-out prompts
            "rollout_score_last20": statistics.fmean(
                statistics.fmean(r["curves"]["toy_score"][-20:]) for r in rs
            ),
            "steps_to_90pct": hit[0] if hit else None,
            "rm_accuracy": statistics.fmean(r["rm"]["eval_accuracy"] for r in rs),
            "rm_segment_accuracy": None if None in seg_acc else statistics.fmean(seg_acc),
            "kl": statistics.fmean(r["ppo"]["kl"] for r in rs),
            "explained_variance": statistics.fmean(ev),
            "flawed_rate_after": statistics.fmean(r["ppo"]["flawed_rate_after"] for r in rs),
        }
    return results, curves


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", default=list(LENGTHS), choices=list(LENGTHS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--report", action="store_true", help="only tabulate the records there")
    parser.add_argument("--search", choices=list(SEARCH), help="add this arm's PPO flags")
    parser.add_argument("--rm-only", action="store_true", help="train the reward models only")
    parser.add_argument("--samples", action="store_true", help="answers of the trained policies")
    args = parser.parse_args()
    if args.samples:
        return show_samples(args)

    summary, last = {"steps": args.steps, "lengths": {}}, None
    for length in args.lengths:
        runs = {name: [] for name in VARIANTS}
        for seed in args.seeds:
            for name in args.variants:
                if not args.report:
                    runs[name].append(run_one(args, length, name, seed))
                elif os.path.exists(path := record_path(args, length, name, seed)):
                    runs[name].append(json.load(open(path)))
        if args.rm_only:
            continue
        warn_mixed_sft(length, runs)
        if not all(runs.values()):
            print(f"{length}: no finished seed of every variant yet")
            continue
        results, curves, last = *summarize(runs), runs
        tokens = [r["curves"]["response_length"][0] for rs in runs.values() for r in rs]
        summary["lengths"][length] = {
            "response_tokens": round(statistics.fmean(tokens), 1),
            "arm": arm_of(args, length),  # the PPO settings it ran with (SEARCH)
            "results": results,
            "curves": curves,
        }
        print_table(length, summary["lengths"][length])
    if not summary["lengths"]:
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "toy_ablation.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(args.out, summary["lengths"], last)


def warn_mixed_sft(length, runs):
    """A line for each seed whose variants ran from different SFT models: the score before PPO
    is the SFT policy's on the same prompts with the same sampling noise, so it must agree (an
    SFT model trained again on another machine differs in the last bits)."""
    before = {}
    for name, rs in runs.items():
        for r in rs:
            before.setdefault(r["ppo_settings"]["seed"], {})[name] = r["ppo"]["toy_score_before"]
    for seed, scores in before.items():
        if len(set(scores.values())) > 1:
            print(f"warning: {length} seed {seed} ran from different SFT models: {scores}")


def print_table(length, row):
    print(f"\n{length}: {row['response_tokens']} response tokens (the SFT policy's, mean)")
    print(
        f"{'variant':8} {'seeds':>5} {'RM acc':>6} {'seg acc':>7} {'before':>6}"
        f" {'after (95% CI)':>16} {'AUC (95% CI)':>16} {'last 20':>7} {'KL':>5} {'EV':>5}"
        f" {'to 90%':>6}"
    )
    for name, r in row["results"].items():
        seg = "-" if r["rm_segment_accuracy"] is None else f"{r['rm_segment_accuracy']:.3f}"
        print(
            f"{name:8} {r['seeds']:5} {r['rm_accuracy']:6.3f} {seg:>7} {r['toy_score_before']:6.3f}"
            f" {r['toy_score_after']:9.3f} ±{r['toy_score_after_ci95']:.3f}"
            f" {r['auc']:9.3f} ±{r['auc_ci95']:.3f} {r['rollout_score_last20']:7.3f}"
            f" {r['kl']:5.2f} {r['explained_variance']:5.2f}"
            f" {str(r['steps_to_90pct']):>6}"
        )


def plot(out, lengths, longest_runs):
    """Left: final score against answer length, a line per variant with its 95% band. Right: the
    learning curves at the longest length run (smoothed over 9 steps), mean of seeds, 95% band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    tokens = [row["response_tokens"] for row in lengths.values()]
    for name in VARIANTS:
        mean = [row["results"][name]["toy_score_after"] for row in lengths.values()]
        half = [row["results"][name]["toy_score_after_ci95"] for row in lengths.values()]
        left.plot(tokens, mean, marker="o", label=name)
        left.fill_between(  # cut to the score's range [0, 1]: a collapsed seed widens the t-band
            tokens,
            [max(0.0, m - h) for m, h in zip(mean, half)],
            [min(1.0, m + h) for m, h in zip(mean, half)],
            alpha=0.2,
        )
        rs = longest_runs[name]
        per_step = list(zip(*(smooth(r["curves"]["toy_score"]) for r in rs)))
        mean, half = zip(*(interval(list(xs)) for xs in per_step))
        steps = range(1, len(mean) + 1)
        right.plot(steps, mean, label=name)
        right.fill_between(
            steps,
            [m - h for m, h in zip(mean, half)],
            [m + h for m, h in zip(mean, half)],
            alpha=0.2,
        )
    before = statistics.fmean(
        row["results"]["bandit"]["toy_score_before"] for row in lengths.values()
    )
    left.axhline(before, color="gray", linestyle=":", label="SFT policy (mean)")
    left.set_xscale("log")
    left.minorticks_off()  # the log axis's own minor labels (2x10^1, ...) would overlap the lengths
    names = [f"{row['response_tokens']:.0f}\n{n}\n{row['arm']}" for n, row in lengths.items()]
    left.set_xticks(tokens, names)
    left.set_xlabel("response tokens (mean, SFT policy)")
    left.set_ylabel("exact toy score after PPO (held-out prompts)")
    left.set_title("final score against answer length, 95% band over seeds")
    longest = list(lengths)[-1]
    right.set_xlabel("PPO step")
    right.set_ylabel("exact toy score of the rollouts")
    right.set_title(f"learning curves, {longest} answers (smoothed over 9 steps)")
    for ax in (left, right):
        ax.legend()  # "best": where it hides the fewest points
    fig.tight_layout()
    fig.savefig(os.path.join(out, "toy_ablation.png"), dpi=120)
    print(f"wrote {out}/toy_ablation.json and toy_ablation.png")


if __name__ == "__main__":
    main()
