"""Speed: does segment-level RLHF cost more than the bandit baseline, and is our segmentation fast?

    # CPU, ~5 min on 2 cores (on the quick start's runs/toy-sft; built first if missing)
    python benchmarks/speed.py
    # on a GPU
    python benchmarks/speed.py --device cuda
    # smoke run: 1 RM epoch, 3 PPO iterations, short timings
    python benchmarks/speed.py --quick

Prints a table (time, ratio to the row's baseline, peak memory, goal, met?) and writes it to
runs/bench/speed.json with the machine and the command. Each row runs in its own process, so its
peak memory (max RSS; torch.cuda.max_memory_allocated on GPU) is its own; its log is
runs/bench/<row>.log.
- segmentation: `segment_ends` vs the authors' per-token loop (one `.item()` per token) and a plain
  loop over Python lists, 64 responses x 512 tokens; all three must give identical ends.
- reward model, seconds per epoch (`time/epoch_s`, eval excluded; the fastest of the epochs: the
  work is the same in every epoch, so the slower ones measure interference from the rest of the
  machine): segment (c = 1.0, entropies cached before the epochs) vs bandit (c = inf) vs TRL's
  RewardTrainer (sequence-level; same toy model, pairs, split, batch size and steps per epoch).
- PPO, seconds per iteration (`time/step_s`, rollout + update; warm-up iterations skipped): segment
  vs bandit rewards, counting model forwards (equal: segmentation rides on the reference forward).
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

import segment_rlhf as S  # noqa: E402

THRESHOLD = (
    1.75  # the paper's c for Phi-3; exact in float32, so tensor and Python comparisons agree
)


def steady(times, skip):
    kept = times[skip:] or times  # the first `skip` are warm-up, unless nothing else is left
    return sum(kept) / len(kept)


def metric(out_dir, key):
    return [json.loads(line)[key] for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def record_calls(name, log):
    """Wrap S.<name> to append each call's seconds to `log`.

    segment_rlhf looks it up at call time.
    """
    fn = getattr(S, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        log.append(time.perf_counter() - start)
        return out

    setattr(S, name, wrapper)


# ----------------------------------------------------------------------------------------------
# Segmentation: the vectorized `segment_ends` against per-token Python loops with the same
# semantics.


def ends_authors_loop(entropy, content_mask, threshold):
    """As the authors' RM trainer does it (DenseRewardRLHF-PPO, rm_trainer.py, segment_data_peak).

    Per row, find the response span, then test each token with one `.item()` (a host sync on GPU).
    End positions per row."""
    rows = []
    for i in range(entropy.shape[0]):
        span, ends = content_mask[i].nonzero(as_tuple=True)[0], []
        if len(span):  # content is one contiguous span per row (the response minus its EOS)
            start, last = span.min().item(), span.max().item()
            for j in range(start, last + 1):
                if entropy[i, j].item() > threshold:
                    ends.append(j)
            if not ends or ends[-1] != last:
                ends.append(last)  # the last content token always closes a segment
        rows.append(ends)
    return rows


def ends_list_loop(entropy, content_mask, threshold):
    """Plain Python at its fastest: one copy to lists, then a loop over every token."""
    rows = []
    for ent, content in zip(entropy.tolist(), content_mask.tolist()):
        ends = [j for j, (e, c) in enumerate(zip(ent, content)) if c and e > threshold]
        last = max((j for j, c in enumerate(content) if c), default=None)
        rows.append(ends if last is None or last in ends[-1:] else ends + [last])
    return rows


def seconds_per_call(fn, budget_s, sync):
    fn(), sync()  # warm-up
    times = []
    while sum(times) < budget_s or len(times) < 5:
        start = time.perf_counter()
        fn(), sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def row_segmentation(args, name):
    g, B, T = torch.Generator().manual_seed(0), 64, 512
    entropy = torch.empty(B, T).exponential_(
        1.0, generator=g
    )  # mean 1 nat: ~17% of tokens above c = 1.75
    prompt = torch.randint(0, T // 2, (B,), generator=g)
    length = (
        torch.rand(B, generator=g) * (T - prompt)
    ).long() + 1  # 1 .. T - prompt response tokens
    pos = torch.arange(T)
    content = (pos >= prompt[:, None]) & (pos < (prompt + length)[:, None])
    entropy, content = entropy.to(args.device), content.to(args.device)
    vectorized = S.segment_ends(entropy, content, THRESHOLD).cpu()
    for loop in (ends_authors_loop, ends_list_loop):
        expected = torch.zeros(B, T, dtype=torch.bool)
        for i, ends in enumerate(loop(entropy, content, THRESHOLD)):
            expected[i, ends] = True
        assert torch.equal(vectorized, expected), f"segment_ends differs from {loop.__name__}"
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    budget = 0.3 if args.quick else 2.0

    def time_of(fn):
        return seconds_per_call(lambda: fn(entropy, content, THRESHOLD), budget, sync)

    return {
        "identical": True,
        "shape": [B, T],
        "threshold": THRESHOLD,
        "ends_per_row": vectorized.sum(-1).float().mean().item(),
        "segment_ends_s": time_of(S.segment_ends),
        "authors_loop_s": time_of(ends_authors_loop),
        "list_loop_s": time_of(ends_list_loop),
    }


# ----------------------------------------------------------------------------------------------
# Reward model: seconds per epoch, ours (segment, bandit) and TRL's RewardTrainer.


def row_rm(args, name):
    out, cache_s = os.path.join(args.work, name), []
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: no entropy cache left over from before
    record_calls(
        "add_entropies", cache_s
    )  # the segment RM's entropy cache, built before the epochs
    start = time.perf_counter()
    result = S.main(
        [
            "train-rm",
            "--model",
            S.TOY_SFT,
            "--epochs",
            str(args.epochs),
            "--output-dir",
            out,
            "--entropy-threshold",
            "1.0" if name == "rm-segment" else "inf",
        ]
    )
    wall, epochs = time.perf_counter() - start, metric(out, "time/epoch_s")
    return {
        "epoch_s": epochs,
        "time_s": min(epochs),
        "entropy_cache_s": sum(cache_s),
        "wall_s": wall,
        "eval_accuracy": result["eval_accuracy"],
    }


def row_trl(args, name):
    try:
        import trl
        from transformers import TrainerCallback
    except ImportError as e:
        return {"na": f"trl not installed: {e}"}

    sft, rm_args, times = S.TOY_SFT, S.RMArgs(epochs=args.epochs), []
    tokenizer = S.load_tokenizer(sft)
    # The pairs and train split of our train-rm, tokenized by our pipeline: the same ids TRL's own
    # chat-template tokenization gives these rows (checked), and only our encoded pairs give our
    # split.
    train = S.rm_pairs(rm_args, tokenizer).train_test_split(
        test_size=rm_args.eval_size, seed=rm_args.seed
    )["train"]
    train = train.map(
        lambda r: {
            "chosen_ids": r["prompt_ids"] + r["chosen_ids"],
            "rejected_ids": r["prompt_ids"] + r["rejected_ids"],
        },
        remove_columns=["prompt_ids"],
    )

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, *_, **__):
            times.append(-time.perf_counter())

        def on_epoch_end(self, *_, **__):
            times[-1] += time.perf_counter()

    config = trl.RewardConfig(
        output_dir=os.path.join(args.work, name),
        per_device_train_batch_size=rm_args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=rm_args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=rm_args.warmup_ratio,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=rm_args.seed,
        max_length=None,
        use_cpu=args.device == "cpu",
        bf16=False,
        gradient_checkpointing=False,  # TRL's defaults are True for both; ours are off
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
    )
    trainer = trl.RewardTrainer(
        model=sft,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[EpochTimer()],
    )
    trainer.train()
    return {
        "epoch_s": times,
        "time_s": min(times),
        "steps_per_epoch": trainer.state.max_steps / args.epochs,
        "train_pairs": len(train),
        "trl_version": trl.__version__,
    }


# ----------------------------------------------------------------------------------------------
# PPO: seconds per iteration with segment vs bandit rewards, from the reward models built above.


def row_ppo(args, name):
    out, calls = os.path.join(args.work, name), []
    record_calls("forward", calls)  # every model forward of the run (generate's steps aside)
    S.main(
        [
            "ppo",
            "--reward-model",
            os.path.join(args.work, name.replace("ppo", "rm")),
            "--steps",
            str(args.ppo_steps),
            "--output-dir",
            out,
            "--overwrite",
        ]
    )
    steps = metric(out, "time/step_s")
    return {
        "step_s": steps,
        "time_s": steady(steps, args.warmup),
        "warmup_iterations": args.warmup,
        "forwards": len(calls),
    }


ROWS = {
    "segmentation": row_segmentation,
    "rm-segment": row_rm,
    "rm-bandit": row_rm,
    "rm-trl": row_trl,
    "ppo-segment": row_ppo,
    "ppo-bandit": row_ppo,
}  # each called as ROWS[name](args, name) in a child process
TABLE = [  # (row, its process, result key, baseline row, goal: max time / baseline time)
    ("segment_ends 64x512", "segmentation", "segment_ends_s", "authors' loop", 0.01),
    ("authors' loop", "segmentation", "authors_loop_s", None, None),
    ("python list loop", "segmentation", "list_loop_s", None, None),
    ("RM segment, epoch", "rm-segment", "time_s", "RM bandit, epoch", 1.10),
    ("RM bandit, epoch", "rm-bandit", "time_s", "TRL RewardTrainer", 1.00),
    ("TRL RewardTrainer", "rm-trl", "time_s", None, None),
    ("PPO segment, iter", "ppo-segment", "time_s", "PPO bandit, iter", 1.10),
    ("PPO bandit, iter", "ppo-bandit", "time_s", None, None),
]


def run_row(args, name):
    """The row in a child process; its result JSON plus its peak memory in MB."""
    result_file, log = (
        os.path.join(args.work, f"{name}.json"),
        os.path.join(args.work, f"{name}.log"),
    )
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--row",
        name,
        "--device",
        args.device,
        "--work",
        args.work,
        "--epochs",
        str(args.epochs),
        "--ppo-steps",
        str(args.ppo_steps),
    ] + ["--quick"] * args.quick
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    print(f"{name}: {time.perf_counter() - start:.0f} s, log {log}")
    if proc.returncode:
        return {"na": f"exit code {proc.returncode}, see {log}"}
    with open(result_file) as f:
        result = json.load(f)
    return {**result, "rss_mb": usage.ru_maxrss / 1024}  # Linux: ru_maxrss is in KiB


def fmt_time(s):
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def machine(device):
    import transformers

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            ),
            cpu,
        )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else cpu,
    }


def report(args, results):
    """Print the table and the notes; return both for the JSON."""
    times, rows = {row: results[proc].get(key) for row, proc, key, _, _ in TABLE}, []
    print(
        f"\n{'row':22} {'time':>10} {'vs':>20} {'ratio':>8} {'peak MB':>8} {'goal':>8} {'met':>4}"
    )
    for row, proc, key, base, goal in TABLE:
        t, r = times[row], results[proc]
        ratio = t / times[base] if base and t and times[base] else None
        met = None if goal is None or ratio is None else ratio <= goal
        rows.append(
            {
                "row": row,
                "time_s": t,
                "baseline": base,
                "ratio": ratio,
                "goal_max_ratio": goal,
                "met": met,
                "peak_mb": r.get("cuda_peak_mb", r.get("rss_mb")),
                "na": r.get("na"),
            }
        )
        print(
            f"{row:22} n/a ({r.get('na', 'no time')})"
            if t is None
            else f"{row:22} {fmt_time(t):>10} {base or '':>20}"
            f" {f'{ratio:#.3g}' if ratio else '':>8} {rows[-1]['peak_mb']:8.0f} "
            f"{f'<= {goal}' if goal else '':>8} {'' if met is None else 'yes' if met else 'NO':>4}"
        )

    def ok(*names):
        return all("na" not in results[n] for n in names)

    seg, rs, rb, ps, pb = (results[n] for n in ROWS if n != "rm-trl")
    notes = [
        "peak memory: "
        + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else "max RSS")
        + " of the row's process; the three segmentation rows share one"
    ]
    if ok("segmentation"):
        notes.append(
            "segment_ends gives the same ends as both loops, "
            f"{seg['authors_loop_s'] / seg['segment_ends_s']:.0f}x "
            "faster than the authors' loop, "
            f"{seg['list_loop_s'] / seg['segment_ends_s']:.0f}x than the list loop"
        )
    if ok("rm-segment", "rm-bandit"):
        notes.append(
            f"segment RM: entropy cache {rs['entropy_cache_s']:.1f} s, once per dataset, "
            "before the epochs; whole run (data, epochs, eval, normalizer, save): "
            f"segment {rs['wall_s']:.0f} s, bandit {rb['wall_s']:.0f} s"
        )
    if ok("ppo-segment", "ppo-bandit"):
        notes.append(
            f"PPO: mean of iterations {args.warmup + 1}..{args.ppo_steps}; "
            "model forwards per run: segment "
            f"{ps['forwards']}, bandit {pb['forwards']} (equal: no extra reference pass)"
        )
    print("\n".join(notes))
    return rows, notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 RM epoch, 3 PPO iterations, short timings",
    )
    parser.add_argument(
        "--epochs", type=int, default=0, help="RM epochs per variant (default 3, quick 1)"
    )
    parser.add_argument(
        "--ppo-steps", type=int, default=0, help="PPO iterations per variant (default 10, quick 3)"
    )
    parser.add_argument("--work", default="runs/bench", help="the runs and logs of the rows")
    parser.add_argument("--out", default="runs/bench/speed.json", help="the table as JSON")
    parser.add_argument(
        "--row", choices=list(ROWS), help=argparse.SUPPRESS
    )  # child process: measure this row
    args = parser.parse_args()
    args.epochs = args.epochs or (1 if args.quick else 3)
    args.ppo_steps = args.ppo_steps or (3 if args.quick else 10)
    args.warmup = 1 if args.ppo_steps <= 4 else 2  # PPO iterations skipped as warm-up
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = (
            ""  # segment_rlhf takes the GPU whenever one is visible
        )
    elif not torch.cuda.is_available():
        S.fail("--device cuda: no GPU visible")
    if args.row:
        result = ROWS[args.row](args, args.row)
        if args.device == "cuda":
            result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        with open(os.path.join(args.work, f"{args.row}.json"), "w") as f:
            json.dump(result, f)
        return

    os.makedirs(args.work, exist_ok=True)
    S.toy_model(S.TOY_SFT)  # the quick start's SFT model, built first where there is none
    results = {name: run_row(args, name) for name in ROWS}
    rows, notes = report(args, results)
    command = "python " + shlex.join(sys.argv)
    out = {
        "command": command,
        "machine": machine(args.device),
        "rm_epochs": args.epochs,
        "ppo_steps": args.ppo_steps,
        "rows": rows,
        "notes": notes,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{command}\n{out['machine']}\nwrote {args.out}")


if __name__ == "__main__":
    main()
