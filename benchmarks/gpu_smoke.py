"""GPU smoke test of the phi3-mini preset: one train-rm step, one PPO step (rollout, update), LoRA.

    # one H100 / H200: the preset's sizes, a few minutes
    python benchmarks/gpu_smoke.py
    # 4 of the step's 16 micro-batches (say so with the figures)
    python benchmarks/gpu_smoke.py --micro-steps 4
    # the same code path on CPU, a tiny Phi-3, seconds
    OMP_NUM_THREADS=1 python benchmarks/gpu_smoke.py --tiny

No download: the Phi-3-mini-4k-instruct architecture is built from its published config with
random weights, and the data are random token ids. Runs segment_rlhf's own functions (rm_forward,
the Bradley-Terry step of train_rm, trainable, make_optimizer, rollout, ppo_update) at the preset's
lengths and batch sizes (PPO: one rollout chunk of --prompts), on one process. Prints, per phase,
the time, tokens/s, peak GPU memory and MFU (a table, then one JSON line) and writes the JSON to
--out.

MFU = model FLOP/s / --peak-tflops, with the usual estimate of 6N FLOPs per trained token and 2N per
forward-only token (N: parameters without the input embedding, LoRA adapters included). Not counted:
attention scores (~10% more at 2k tokens), the recompute of gradient checkpointing (hardware FLOPs
are 8N, x 4/3), and the missing weight gradients of LoRA's frozen base (there a training token costs
~4N, not 6N).
"""

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import segment_rlhf as S  # noqa: E402

# microsoft/Phi-3-mini-4k-instruct config.json (transformers 4.40 era), typed in.
# generation_config.json stops on <|endoftext|> 32000, <|assistant|> 32001 and <|end|> 32007;
# pad is 32000.
PHI3_MINI = dict(
    vocab_size=32064,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=2047,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=32000,
    pad_token_id=32000,
    attention_dropout=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
)
TINY = dict(
    PHI3_MINI,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
STOP_IDS, PAD_ID = (
    [32000, 32001, 32007],
    32000,
)  # what ppo() computes from the tokenizer ("<|end|>" = 32007)
PRESET = "phi3-mini"

# Sizes: the preset's (one GPU), or a CPU-sized run of the same code. RM: pairs per micro-batch,
# micro-batches per optimizer step, tokens per sequence. PPO: prompts in the rollout chunk and
# rollouts per update micro-batch (the preset generates --rollout-chunk 64 prompts at once per
# process: --prompts 64 measures that memory).
FULL = dict(
    pairs=S.PAPER_RM["batch_size"] // S.PAPER_RM["grad_accum"],
    micro_steps=S.PAPER_RM["grad_accum"],
    rm_len=S.PAPER_RM["max_len"],
    prompts=16,
    prompt_len=S.PAPER_PPO["max_prompt_len"],
    new_tokens=S.PAPER_PPO["max_new_tokens"],
    ppo_micro=S.PAPER_PPO["mini_batch_size"] // S.PAPER_PPO["grad_accum"],
)
SMALL = dict(
    pairs=2, micro_steps=2, rm_len=64, prompts=4, prompt_len=32, new_tokens=16, ppo_micro=2
)


def build(config, kind, dtype, device):
    """A random-weight model as segment_rlhf.load_model gives it.

    A causal LM or a value model (backbone + score head).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Phi3Config

    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    with torch.device(device):  # weights are created (and initialised) on the GPU directly
        model = auto.from_config(
            Phi3Config(**config, num_labels=1), dtype=dtype, attn_implementation="sdpa"
        )
    if kind == "causal":
        model.generation_config.eos_token_id = STOP_IDS
    return model


def flop_params(model):
    """N of the 6N / 2N estimates: all parameters but the input embedding.

    (A lookup costs no FLOPs.)
    """
    m = S.unwrap(model)
    return sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()


def lap(device):
    """Wall time once the GPU has finished its queue, and the peak memory (GiB) since the last lap.

    Resets the peak.
    """
    if device.type != "cuda":
        return time.perf_counter(), None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return time.perf_counter(), peak


def phase(name, seconds, tokens, flops, peak_gib, a, device):
    mfu = (
        flops / seconds / (a.peak_tflops * 1e12) if device.type == "cuda" else None
    )  # no peak to compare on CPU
    return {
        "phase": name,
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "tflops": round(flops / seconds / 1e12, 3),
        "mfu": mfu and round(mfu, 4),
        "peak_mem_gib": peak_gib and round(peak_gib, 2),
    }


def finite(name, value):
    if not math.isfinite(value):
        raise SystemExit(f"gpu_smoke: {name} is {value}")
    return round(value, 4)


def rm_step(a, config, device):
    """One train-rm optimizer step (full fine-tuning).

    micro-steps x micro-batches of `pairs` random pairs.
    """
    args = S.RMArgs(
        **{
            **S.preset_defaults(PRESET, "train-rm"),
            "batch_size": a.pairs * a.micro_steps,
            "grad_accum": a.micro_steps,
            "max_len": a.rm_len,
            "max_prompt_len": a.rm_len // 2,
        }
    )
    accelerator = S.make_accelerator(args)
    # Random pairs at full length: prompt, then a response closed by <|end|>; random entropies stand
    # in for the reference model's (train_rm computes them once per example, before training, so
    # they cost no step time).
    P, R = args.max_prompt_len, args.max_len - args.max_prompt_len

    def ids(n):
        return torch.randint(0, 32000, (n,)).tolist()

    rows = [
        {
            "prompt_ids": ids(P),
            "chosen_ids": ids(R - 1) + [STOP_IDS[2]],
            "rejected_ids": ids(R - 1) + [STOP_IDS[2]],
            "chosen_entropy": (torch.rand(R) * 2 * args.entropy_threshold).tolist(),
            "rejected_entropy": (torch.rand(R) * 2 * args.entropy_threshold).tolist(),
        }
        for _ in range(args.batch_size)
    ]
    loader = torch.utils.data.DataLoader(
        rows, batch_size=a.pairs, collate_fn=S.pair_collate(PAD_ID, bandit=False)
    )
    # As train_rm: fp32 weights under bf16 autocast for full fine-tuning, bf16 weights only with
    # LoRA.
    model = build(
        config, "value", torch.bfloat16 if args.bf16 and args.lora_rank else torch.float32, device
    )
    model = S.trainable(model, args, "value")
    optimizer, scheduler = S.make_optimizer(model, args, 1)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    start, _ = lap(device)
    laps = []
    for batch in loader:  # the loop body of train_rm
        with accelerator.accumulate(model):
            _, _, scores = S.rm_forward(model, batch, args.entropy_threshold)
            chosen, rejected = scores.chunk(2)
            loss = S.bradley_terry_loss(chosen, rejected)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        laps.append(lap(device))
    # Throughput leaves out the first micro-batch (CUDA / cuBLAS warm-up) when there is more than
    # one.
    first = 1 if len(laps) > 1 else 0
    seconds = laps[-1][0] - (laps[0][0] if first else start)
    tokens = (len(laps) - first) * 2 * a.pairs * args.max_len
    peaks = [p for _, p in laps if p is not None]
    row = phase(
        "train-rm step",
        seconds,
        tokens,
        6 * flop_params(model) * tokens,
        max(peaks, default=None),
        a,
        device,
    )
    out = {
        "rm/loss": finite("rm/loss", loss.item()),
        "rm/params": flop_params(model),
        "rm/step_s": round(laps[-1][0] - start, 3),
    }
    return row, out


def ppo_step(a, config, device):
    """One PPO iteration of the preset with LoRA.

    Rollout of one chunk of random prompts, then one update.
    """
    args = S.PPOArgs(
        **{
            **S.preset_defaults(PRESET, "ppo"),
            "lora_rank": a.lora_rank,
            "batch_size": a.prompts,
            "mini_batch_size": a.prompts,
            "grad_accum": a.prompts // a.ppo_micro,
            "rollout_chunk": a.prompts,
            "max_prompt_len": a.prompt_len,
            "max_new_tokens": a.new_tokens,
            "max_len": a.prompt_len + a.new_tokens,
            "reward_mode": "segment",
            "end_penalty": None,  # what resolve() gives phi3-mini's segment run
            "length_norm": False,
            "value_clip": 0.25,
        }
    )  # what ppo() resolves for a segment RM
    args.micro_batch = a.ppo_micro  # what resolve() derives: rollouts per process per forward
    settings = S.released_rm_settings(
        S.PAPER_MODELS[PRESET]["rm"].format("segment")
    )  # c, normalizer, mean / std
    accelerator = S.make_accelerator(args)
    # As ppo() with --bf16 --lora-rank: frozen bf16 bases, fresh critic head, reference = policy
    # without adapters.
    policy, critic = (
        build(config, "causal", torch.bfloat16, device),
        build(config, "value", torch.bfloat16, device),
    )
    S.init_head(critic, args.head_init, critic=True)
    policy, critic = S.trainable(policy, args, "causal"), S.trainable(critic, args, "value")
    rm = build(config, "value", torch.bfloat16, device).eval().requires_grad_(False)

    def ref_logits(seq, attn):
        with S.unwrap(policy).disable_adapter():
            return S.forward(policy, seq, attn).logits

    opt_p, _ = S.make_optimizer(policy, args, 1)
    opt_c, _ = S.make_optimizer(critic, dataclasses.replace(args, lr=args.critic_lr), 1)
    policy, critic, opt_p, opt_c = accelerator.prepare(policy, critic, opt_p, opt_c)
    models = types.SimpleNamespace(  # what ppo_models() gives ppo()
        accelerator=accelerator,
        policy=policy,
        critic=critic,
        rm=rm,
        ref_logits=ref_logits,
        stop_ids=STOP_IDS,
        pad_id=PAD_ID,
    )
    prompt_ids = torch.randint(0, 32000, (a.prompts, a.prompt_len), device=device)

    timing, generate = {}, S.generate

    def timed_generate(*gen_args):  # rollout() calls S.generate: time sampling apart from scoring
        timing["start"] = lap(device)
        out = generate(*gen_args)
        timing["end"] = lap(device)
        return out

    S.generate = timed_generate
    policy.eval()
    critic.eval()
    data = S.rollout(models, prompt_ids, torch.ones_like(prompt_ids), args, settings)
    done, score_peak = lap(device)
    S.generate = generate
    data["advantages"] = S.whiten(data["advantages"], data["mask"])
    policy.train()
    critic.train()
    n = len(data["seq"])
    stats = [
        S.ppo_update(models, {k: v[idx] for k, v in data.items()}, (opt_p, opt_c), args, 1)
        for idx in torch.randperm(n, device=device).split(args.micro_batch)
    ]
    end, update_peak = lap(device)

    B, T = data["seq"].shape
    new = data["response"].shape[1]  # sampled positions per row (random weights seldom stop early)
    n_pol, n_crit, n_rm = flop_params(policy), flop_params(critic), flop_params(rm)
    gen_s, gen_peak = timing["end"][0] - timing["start"][0], timing["end"][1]
    rows = [
        phase(
            "ppo generate", gen_s, B * new, 2 * n_pol * B * T, gen_peak, a, device
        ),  # prefill + one token per step
        # policy and critic forwards, the reference (policy, adapters off) and the reward model,
        # each on (B, T)
        phase(
            "ppo score",
            done - timing["end"][0],
            B * T,
            2 * (2 * n_pol + n_crit + n_rm) * B * T,
            score_peak,
            a,
            device,
        ),
        phase(
            "ppo update", end - done, B * T, 6 * (n_pol + n_crit) * B * T, update_peak, a, device
        ),
    ]
    mean = {k: torch.stack([s[k] for s in stats]).mean().item() for k in stats[0]}
    pg, vf, entropy = mean["losses/policy"], mean["losses/value"], mean["ppo/entropy"]
    out = {
        "ppo/policy_loss": finite("policy loss", pg),
        "ppo/value_loss": finite("value loss", vf),
        "ppo/kl": finite("kl", data["kl"].mean().item()),
        "ppo/entropy": round(entropy, 3),
        "ppo/response_length": data["mask"].sum(-1).mean().item(),
        "ppo/stopped": data["stopped"].mean().item(),
        "ppo/segments_per_response": data["ends"].float().sum(-1).mean().item(),
        "ppo/params_policy": n_pol,
        "ppo/trainable_policy": sum(p.numel() for p in policy.parameters() if p.requires_grad),
    }
    return rows, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a 2-layer Phi-3 and short lengths: runs on CPU in seconds",
    )
    for name in FULL:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            help=f"default: {FULL[name]} ({SMALL[name]} with --tiny)",
        )
    parser.add_argument(
        "--lora-rank", type=int, default=64, help="LoRA rank of policy and critic in the PPO step"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="the GPU's dense bf16 peak (H100 / H200 SXM: 989)",
    )
    parser.add_argument("--out", default="runs/gpu_smoke.json")
    a = parser.parse_args()
    for name, value in (SMALL if a.tiny else FULL).items():
        setattr(a, name, value if getattr(a, name) is None else getattr(a, name))
    if a.prompts % a.ppo_micro:
        raise SystemExit(
            f"gpu_smoke: --prompts {a.prompts} must be a multiple of --ppo-micro {a.ppo_micro}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TINY if a.tiny else PHI3_MINI

    rm_row, rm_out = rm_step(a, config, device)
    # the RM step's model sits in a reference cycle (accelerate's forward wrapper):
    # free it before PPO
    gc.collect()
    ppo_rows, ppo_out = ppo_step(a, config, device)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": "tiny Phi-3" if a.tiny else "Phi-3-mini-4k-instruct (random weights)",
        "sizes": {k: getattr(a, k) for k in FULL},
        "lora_rank": a.lora_rank,
        "peak_tflops": a.peak_tflops,
        "phases": [rm_row, *ppo_rows],
        **rm_out,
        **ppo_out,
    }
    print(
        f"{result['model']} on {result['device']}, torch {result['torch']}, {result['date']}; "
        f"train-rm step: {a.micro_steps} micro-batches x {2 * a.pairs} sequences"
        f" x {a.rm_len} tokens"
    )
    print(
        f"{'phase':14} {'s':>8} {'tokens':>9} {'tokens/s':>10}"
        f" {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}"
    )
    for r in result["phases"]:
        mfu, mem = (
            "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}",
            "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}",
        )
        print(
            f"{r['phase']:14} {r['seconds']:8.2f} {r['tokens']:9d} {r['tokens_per_s']:10.0f}"
            f" {r['tflops']:8.2f} {mfu:>6} {mem:>9}"
        )
    print(json.dumps(result))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
