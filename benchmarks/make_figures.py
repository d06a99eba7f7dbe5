"""Draw the README's pictures into docs/ from the toy runs (building what is missing first).

    python benchmarks/make_figures.py        # runs/toy-{sft,rm,ppo} from the quick start, or new

- docs/segments.html and .png: the toy's chosen and rejected answers, each segment shaded by its
  reward, with the per-token entropy strip (the PNG is a headless Chromium screenshot of the page,
  taken when `chromium` is on the PATH).
- docs/normalizer.png: mean and std of the segment rewards per position p = k / K with the fitted
  location-aware lines mu(p) and sigma(p) (what `fit-norm --plot` draws).
- docs/ppo_curve.png: the exact toy score and the reward model's score per PPO iteration.
- docs/smollm2_segments.html and .png: one of SmolLM2-135M-Instruct's own answers
  (benchmarks/smollm2_answers.jsonl) cut at c = 3.0, when benchmarks/get_smollm2.py has fetched
  the model and the gguf package is installed.
Needs matplotlib (pip install matplotlib).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import segment_rlhf as S  # noqa: E402
from benchmarks import extras  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")


def screenshot(page, png, size="1100,330"):
    """A PNG of an HTML page through headless Chromium, flags as for a sandboxed machine."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium on the PATH: skipped", png, file=sys.stderr)
        return
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-quic",
    ]
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser,
            *flags,
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            f"--screenshot={os.path.abspath(png)}",
            "file://" + os.path.abspath(page),
        ]
        subprocess.run(cmd, check=True, capture_output=True)
    return png


def normalizer_plot(rm_dir, png):
    """Score the toy preference responses with the reward model and draw the fit."""
    settings = S.load_rm_settings(rm_dir)
    args = S.resolve("fit-norm", S.FitNormArgs(reward_model=rm_dir))
    accelerator = S.make_accelerator(args)
    tokenizer = S.load_tokenizer(rm_dir)
    ds = S.rm_pairs(args, tokenizer)
    ds = S.add_entropies(ds, args, accelerator, settings["reference_model"], tokenizer)
    collate = S.pair_collate(tokenizer.pad_token_id, bandit=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=collate)
    model = S.load_model(rm_dir, "value")
    positions, rewards, *_ = S.collect_segment_rewards(
        model, loader, settings["entropy_threshold"], accelerator
    )
    extras.plot_normalizer(png, positions, rewards, settings["normalizer"])
    return png


def learning_curve(metrics, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics)]
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 3.6), dpi=100, sharex=True)
    top.plot(steps, [r["ppo/toy_score"] for r in rows], color="tab:blue")
    top.set_ylabel("exact toy score", fontsize=9)
    bottom.plot(steps, [r["ppo/reward"] for r in rows], color="tab:orange")
    bottom.set_ylabel("reward model score", fontsize=9)
    bottom.set_xlabel("PPO iteration (rollouts of the training prompts)", fontsize=9)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    return png


def smollm2_view(page):
    """The segment view of SmolLM2's answer to the sky question, as the answers were generated."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import get_smollm2

    gguf = os.path.join(get_smollm2.default_dir(), get_smollm2.NAME)
    if not os.path.exists(gguf):
        print("SmolLM2 not fetched (python benchmarks/get_smollm2.py): skipped", file=sys.stderr)
        return False
    answer = [
        json.loads(line)
        for line in open(os.path.join(DOCS, "..", "benchmarks", "smollm2_answers.jsonl"))
    ][1]
    system = {"role": "system", "content": "You are a helpful assistant."}
    turns = [
        system,
        {"role": "user", "content": answer["prompt"]},
        {"role": "assistant", "content": answer["response"]},
    ]
    with tempfile.TemporaryDirectory() as tmp:
        rows = os.path.join(tmp, "answer.jsonl")
        with open(rows, "w") as f:
            f.write(json.dumps({"chosen": turns}) + "\n")
        S.main(
            [
                "segment",
                "--model",
                gguf,
                "--dataset",
                rows,
                "--entropy-threshold",
                "3.0",
                "--html",
                page,
            ]
        )
    return True


def main():
    os.makedirs(DOCS, exist_ok=True)
    if not os.path.exists(os.path.join(S.TOY_PPO, "metrics.jsonl")):
        S.main(["ppo"])  # the quick start: builds the toy SFT and reward models on the way
    page = os.path.join(DOCS, "segments.html")
    S.main(["segment", "--reward-model", S.TOY_RM, "--html", page])
    written = [page, screenshot(page, os.path.join(DOCS, "segments.png"))]
    written.append(normalizer_plot(S.TOY_RM, os.path.join(DOCS, "normalizer.png")))
    metrics = os.path.join(S.TOY_PPO, "metrics.jsonl")
    written.append(learning_curve(metrics, os.path.join(DOCS, "ppo_curve.png")))
    page = os.path.join(DOCS, "smollm2_segments.html")
    if smollm2_view(page):
        png = os.path.join(DOCS, "smollm2_segments.png")
        written += [page, screenshot(page, png, size="900,520")]
    print("wrote", ", ".join(os.path.relpath(p) for p in written if p))  # what this run drew


if __name__ == "__main__":
    main()
