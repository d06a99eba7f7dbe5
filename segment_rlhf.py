"""Segment-level RLHF in one file: entropy segments, a segment reward model, location-aware
normalization, within-segment interpolation and PPO against the dense rewards.

Yin et al., 2025, "Segmenting Text and Learning Their Rewards for Improved RLHF in Language Model"
(arXiv 2501.02790). A bandit reward model gives PPO one number per response; a token-level one gives
a noisy number per token. The paper rewards *segments*: a segment ends wherever the frozen reference
model is unsure what comes next (next-token entropy above a cutoff c); the reward model's per-token
head read at a segment's last token is that segment's reward, and a response scores the mean of its
segment rewards (Bradley-Terry on ordinary preference pairs, no segment labels). For PPO each
segment reward is normalized with a mean and std that depend on where the segment sits in the
response, spread evenly over its tokens, and optimized with a KL penalty.

Pipeline:  sft (toy only) -> train-rm -> ppo;  `segment` shows a response cut into its segments.

    python segment_rlhf.py ppo                     # toy task on a CPU; builds sft and the RM first
    python segment_rlhf.py segment --reward-model runs/toy-rm
    python segment_rlhf.py train-rm --preset phi3-mini --dry-run      # the paper's settings
    python segment_rlhf.py train-rm --preset phi3-mini --lora-rank 64
    accelerate launch --multi_gpu --num_processes 8 segment_rlhf.py ppo --preset phi3-mini
    python segment_rlhf.py segment --model SmolLM2-135M-Instruct.Q4_1.gguf --entropy-threshold 3

    from segment_rlhf import segment_rewards    # a saved reward model's segments and rewards
    answer = ("Name 6 fruits.", "Fruits: apple, fig, kiwi, lemon, mango, plum.")
    segment_rewards("runs/toy-rm", [answer])

Reading order: configuration, the method (sections 1-5: small pure functions), the training loops,
the toy task. Everything below the toy task is plumbing: data, models, runs, presets, the CLI.
"""

import argparse
import bisect
import dataclasses
import functools
import hashlib
import html
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import types
from dataclasses import dataclass, field

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_scheduler,
)

# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass per subcommand, each field a flag; the defaults are the toy run.


def arg(default, help, **extra):
    """A dataclass field that is also a command-line flag with this help text."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Common:
    model: str = arg("", "SFT / reference model: hub id or directory (default: toy SFT model)")
    dataset: str = arg("", "hub id or a .json/.jsonl/.parquet file (default: the toy task)")
    output_dir: str = arg("", "where the run is written (default: runs/toy-<subcommand>)")
    seed: int = arg(0, "random seed")
    max_len: int = arg(64, "max tokens of prompt + response")
    max_prompt_len: int = arg(32, "prompts longer than this are cut from the left")
    end_token: str = arg("", "token closing a response (default: the tokenizer's eos)")
    lr: float = arg(1e-3, "learning rate")
    batch_size: int = arg(32, "global batch size (pairs for train-rm, prompts for ppo)")
    grad_accum: int = arg(1, "gradient accumulation steps per optimizer step")
    warmup_ratio: float = arg(0.03, "linear warm-up, as a fraction of all steps")
    bf16: bool = arg(False, "bf16 mixed precision")
    overwrite: bool = arg(False, "allow writing into an existing run directory")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward: less memory")
    lora_rank: int = arg(0, "LoRA rank (peft) of the trained models; 0: full fine-tuning")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator")
    lora_targets: str = arg("all-linear", "modules that get adapters (peft target_modules)")
    preset: str = arg("", "paper settings: phi3-mini | llama3-sft-8b | llama31-instruct-8b")
    dry_run: bool = arg(False, "print the resolved configuration and exit")
    save_every: int = arg(0, "train-rm, ppo: checkpoint every N optimizer steps / iterations")
    resume: bool = arg(False, "train-rm, ppo: continue from the newest checkpoint")
    min_lr_ratio: float = arg(0.0, "cosine decay to this fraction of --lr (the authors: 0.1)")
    long_pairs: str = arg("skip", "pairs over --max-len", choices=("skip", "truncate"))
    head_init: str = arg("model", "fresh scalar heads", choices=("model", "authors"))
    micro_batch: int = field(default=0, init=False)  # derived: rows per process per forward
    final_dir: str = field(default="", init=False)  # derived: where the run ends up (see
    # prepare_output_dir); output_dir is where it is written meanwhile
    created: bool = field(default=False, init=False)  # derived: output_dir is this run's own


@dataclass
class SFTArgs(Common):
    epochs: int = arg(6, "passes over the SFT data")
    flaw_rate: float = arg(0.2, "toy only: per-item flaw rate of the SFT targets")


@dataclass
class RMArgs(Common):
    entropy_threshold: float = arg(1.0, "entropy cutoff c: 0 token level, inf bandit")
    epochs: int = arg(5, "passes over the preference data")
    lr: float = arg(3e-4, "learning rate")
    eval_size: int = arg(200, "pairs held out from the training data for evaluation")
    norm_samples: int = arg(0, "training pairs scored to fit the normalizer; 0: all")


@dataclass
class FitNormArgs(Common):
    reward_model: str = arg("runs/toy-rm", "reward model directory whose normalizer is refitted")
    norm_samples: int = arg(0, "preference pairs scored; 0: all (the authors: 60,000 pairs)")
    plot: str = arg("", "also draw means / stds per position and the fitted curves to this PNG")


@dataclass
class PPOArgs(Common):
    reward_model: str = arg("", "reward model directory from train-rm (default: the toy one)")
    reward_mode: str = arg("", "default: the RM's", choices=("segment", "token", "bandit"))
    interpolation: str = arg("even", "within-segment split", choices=("even", "last", "repeat"))
    location_norm: bool = arg(True, "location-aware normalization (--no-location-norm: raw)")
    steps: int = arg(120, "PPO iterations (rollout batch + update)")
    episodes: float = arg(0.0, "if > 0: --steps = this many passes over the prompts")
    batch_size: int = arg(64, "rollout batch: prompts per iteration (global)")
    mini_batch_size: int = arg(16, "train batch: rollouts per optimizer step (global)")
    ppo_epochs: int = arg(2, "passes over each rollout batch")
    lr: float = arg(3e-5, "actor learning rate")
    critic_lr: float = arg(1e-4, "critic learning rate")
    beta: float = arg(0.3, "KL coefficient, fixed (paper 0.01; toy 0.3: README, the toy)")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    clip_eps: float = arg(0.2, "policy ratio clip")
    value_clip: float = arg(float("nan"), "value clip (default: 0.25 dense, 0.2 bandit)")
    temperature: float = arg(1.0, "sampling temperature")
    top_p: float = arg(1.0, "nucleus sampling")
    max_new_tokens: int = arg(24, "generation length limit")
    missing_eos_penalty: float = arg(1.0, "subtracted at the end of unended responses (paper 0)")
    end_penalty: float = arg(
        float("nan"),
        "reward at every token of responses without end or "
        "over --end-penalty-len, instead of theirs (default: preset's, else 0)",
    )
    end_penalty_len: int = arg(800, "response length over which --end-penalty applies")
    length_norm: bool = arg(
        None, "divide every token reward by the response length (default: the preset's, else off)"
    )
    eval_prompts: int = arg(128, "held-out prompts scored before and after training")
    rollout_chunk: int = arg(64, "prompts generated and scored at once per process (memory)")


@dataclass
class SegmentArgs:
    prompt: str = arg(None, "user prompt (chat template applied)")
    response: str = arg(None, "response to segment")
    text: str = arg(None, "raw text to segment, no chat template")
    dataset: str = arg(None, "take the pair from this dataset's row --row (its chosen response)")
    row: int = arg(0, "dataset row")
    model: str = arg("", "reference model giving the entropies (default: the reward model's)")
    reward_model: str = arg("", "reward model directory: adds segment rewards")
    entropy_threshold: float = arg(float("nan"), "cutoff c (default: the reward model's, else 1)")
    html: str = arg("", "also write the segments as an HTML page to this file")
    end_token: str = arg("", "token closing a response (default: the tokenizer's eos)")


# ----------------------------------------------------------------------------------------------
# 1. Entropy segmentation. The frozen reference model reads prompt + response once; its entropy
#        H[t] = -sum_v p(v | y_<=t) log p(v | y_<=t)
# says how unsure it is of the token after t. Where H[t] > c, token t closes a segment:
#        ends = { t in content : H[t] > c }  U  { the last content token },
# content being the response minus its closing end token. c = 0 gives one segment per token (the
# token-level baseline); c = inf one segment per response (the bandit baseline), read at the end
# token itself, as a sequence-level reward model reads it.


def token_entropy(logits):
    """(B, T, V) -> (B, T) entropy in nats, in float32 whatever the input dtype.

    The textbook -sum p log p holds p and log p, two (B, T, V) float32 tensors: 2 x 8 GB for 8 rows
    of 2048 tokens over Llama-3's 128k vocabulary. With log p = z - log Z (z the logits),
        H = log Z - sum_v p(v) z(v),
    which needs p alone, multiplied by z in place. log Z = z* - log p*, from the top logit z*.
    """
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (B, T, V): the one extra tensor
    top, idx = logits.max(-1)
    log_z = top.float() - p.gather(-1, idx.unsqueeze(-1)).squeeze(-1).log()
    return log_z - p.mul_(logits).sum(-1)


def segment_ends(entropy, content_mask, threshold):
    """(B, T) bool: content positions with entropy > threshold, and each row's last content one.

        entropy      0.1  2.5  0.3  2.0  3.0  0.2  9.0      threshold c = 2.0
        content        0    1    1    1    1    1    0      (prompt token, 5 tokens, end token)
        ends           0    1    0    0    1    1    0      (2.0 is not > 2.0; 5 is the last)

    The last content position is where the running count of content tokens reaches the total.
    """
    content_mask = content_mask.bool()
    total = content_mask.sum(-1, keepdim=True)
    is_last = (content_mask.cumsum(-1) == total) & content_mask
    return ((entropy > threshold) & content_mask) | is_last


# ----------------------------------------------------------------------------------------------
# 2. Segment reward model. The LM backbone and a linear head (hidden -> 1, no bias) give a value
# v[t] at every token, the layout of AutoModelForSequenceClassification(num_labels=1). Segment k's
# reward is the value at its last token, r_k = v[end_k]; a response scores the mean of its K
# segment rewards, s(y) = (1/K) sum_k r_k. Trained on preference pairs (y+ chosen, y- rejected) with
#        L = -log sigmoid(s(y+) - s(y-))        (Bradley-Terry)
# the model learns by itself which segments carry the preference.


def token_values(model, input_ids, attention_mask):
    """(B, T) head output at every position: the reward model's v[t], or the critic's value.
    The model's own output pools the value at one position, so a hook reads the head's output
    at every position as the forward computes it: no second pass over the head, and no need
    to keep every layer's hidden states (output_hidden_states) for the last one."""
    values = []
    hook = unwrap(model).score.register_forward_hook(lambda m, i, out: values.append(out))
    try:
        forward(model, input_ids, attention_mask)
    finally:
        hook.remove()
    return values[0].squeeze(-1).float()


def segment_scores(values, ends):
    """(B,) mean of `values` at the segment ends of each row (0 for a row with no segment)."""
    ends = ends.float()
    return (values * ends).sum(-1) / ends.sum(-1).clamp(min=1)


def bradley_terry_loss(chosen_scores, rejected_scores):
    """-log sigmoid(s+ - s-), averaged over the pairs."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


# ----------------------------------------------------------------------------------------------
# 3. Location-aware normalization. Segment rewards drift with where the segment sits, so the
# mean and std of the classic reward normalization become functions of the relative position
# p = k / K of segment k among K:
#        mu(p) = a_mu ln p + b_mu,   sigma(p) = a_sigma ln p + b_sigma,   r~_k = (r_k - mu) / sigma.
# Fit: score many preference responses, group the segment rewards by p (rounded to 3 decimals),
# take each group's mean and std, and regress both on ln p with a Huber loss (robust to the small
# groups at rare positions). The bandit keeps one scalar mean and std.


def segment_positions(ends):
    """(B, T): k / K at the end of segment k of K, 0 elsewhere."""
    ends = ends.float()
    return ends.cumsum(-1) / ends.sum(-1, keepdim=True).clamp(min=1) * ends


def huber_fit(x, y, delta=1.35, iters=100):
    """Slope and intercept of y ~ a x + b under a Huber loss, by iteratively reweighted least
    squares: points whose residual exceeds delta robust scales get weight delta scale / residual."""
    if x.unique().numel() < 2:
        return 0.0, y.mean().item()
    X = torch.stack([x, torch.ones_like(x)], 1).double()
    w, y = torch.ones_like(x).double(), y.double()
    for _ in range(iters):
        sw = w.sqrt()[:, None]
        coef = torch.linalg.lstsq(X * sw, y[:, None] * sw).solution.squeeze(1)
        resid = (y - X @ coef).abs()
        scale = (1.4826 * resid.median()).clamp(min=1e-8)  # robust residual scale (MAD)
        w = (delta * scale / resid.clamp(min=1e-12)).clamp(max=1.0)
    return coef[0].item(), coef[1].item()


def fit_location_normalizer(positions, rewards):
    """(a_mu, a_sigma, b_mu, b_sigma) from 1-D tensors of segment positions p and rewards r."""
    groups, index = torch.unique(torch.round(positions.double() * 1000) / 1000, return_inverse=True)
    count = torch.bincount(index, minlength=len(groups)).double()
    mean = torch.zeros_like(groups).index_add_(0, index, rewards.double()) / count
    sq_dev = (rewards.double() - mean[index]) ** 2
    var = torch.zeros_like(groups).index_add_(0, index, sq_dev) / count
    keep = count >= 2  # a single sample has no std
    x = groups[keep].log()
    (a_mu, b_mu), (a_sigma, b_sigma) = huber_fit(x, mean[keep]), huber_fit(x, var[keep].sqrt())
    return a_mu, a_sigma, b_mu, b_sigma


def normalize_segment_rewards(values, ends, params, min_position=0.0, min_sigma=1e-3):
    """(B, T): (v - mu(p)) / sigma(p) at segment ends, 0 elsewhere."""
    a_mu, a_sigma, b_mu, b_sigma = params
    # Implementation detail: positions below the smallest p seen in fitting use that p, and sigma
    # is kept above min_sigma. The fitted lines do not extrapolate: a sigma line crosses zero for
    # small enough p, and a policy that cut its responses into many more segments than the fit saw
    # got rewards divided by ~0 (seen on the toy; the paper's Llama-3-SFT token-level line turns
    # negative past ~246 segments).
    log_p = segment_positions(ends).clamp(min=max(min_position, 1e-12)).log()
    sigma = (a_sigma * log_p + b_sigma).clamp(min=min_sigma)
    return torch.where(ends.bool(), (values - (a_mu * log_p + b_mu)) / sigma, 0.0)


# ----------------------------------------------------------------------------------------------
# 4. Within-segment interpolation. PPO wants a reward per token, the model gives one per segment.
# The paper's "even" split gives every token of segment k the value r~_k / len_k, so the tokens of
# a segment sum to its reward. Ablations: "last" (all of it on the segment's last token) and
# "repeat" (r~_k on every token).


def interpolate_rewards(seg_rewards, ends, content_mask, mode="even"):
    """(B, T): spread each segment's reward (held at its end position) over the segment's tokens.

    The segment index of each token is the number of ends strictly before it:
        ends     0  1  0  0  1            cumsum(ends) - ends
        seg_id   0  0  1  1  1            (token 1 closes segment 0 and still belongs to it)
    scatter_add then sums rewards and lengths per segment, and gather hands them back per token.
    """
    ends, content = ends.bool(), content_mask.bool()
    if mode == "last":
        return torch.where(ends, seg_rewards, 0.0)
    seg_id = (ends.long().cumsum(-1) - ends.long()).clamp(max=ends.shape[1] - 1)
    at_ends = torch.where(ends, seg_rewards, 0.0)
    reward_of = torch.zeros_like(seg_rewards).scatter_add_(1, seg_id, at_ends)
    length_of = torch.zeros_like(seg_rewards).scatter_add_(1, seg_id, content.to(seg_rewards.dtype))
    per_token = reward_of.gather(1, seg_id)
    if mode == "even":
        per_token = per_token / length_of.gather(1, seg_id).clamp(min=1)
    elif mode != "repeat":
        raise ValueError(f"interpolation mode must be even, last or repeat, got {mode!r}")
    return torch.where(content, per_token, 0.0)


# ----------------------------------------------------------------------------------------------
# 5. PPO with dense rewards. Each rollout is segmented with the reference entropies (1), its
# segment rewards (2) normalized for their position (3) and spread over their tokens (4). The
# reward of token t is then
#        R_t = clamp(r_t, -10, 10) - beta (log pi(a_t) - log pi_ref(a_t)),
# GAE turns rewards and critic values into advantages (gamma = 1, lambda = 0.95), whitened over
# the rollout batch, and the actor and critic take clipped PPO steps. The critic starts from the
# SFT model with a fresh head, not from the reward model.


def dense_rewards(rm_values, entropy, mask, stop, mode, threshold, norm, interpolation):
    """(B, R) per-token rewards of sampled responses, their segment ends and raw (B,) scores.

    mask: response tokens up to and including the stop token; stop: the stop token itself;
    mode: segment | token | bandit; norm: the reward model's fitted statistics, None for raw."""
    if mode == "bandit":  # one segment, read at the end token (the last token when truncated)
        ends = segment_ends(entropy, mask, float("inf"))
        seg = rm_values if norm is None else (rm_values - norm["mean"]) / norm["std"]
        dense = torch.where(ends, seg, 0.0)
    else:
        content = mask & ~stop  # the stop token is not content
        ends = segment_ends(entropy, content, threshold)
        seg = rm_values
        if norm is not None:
            min_p = norm.get("min_position", 0.0)
            seg = normalize_segment_rewards(rm_values, ends, norm["normalizer"], min_p)
        dense = interpolate_rewards(seg, ends, content, interpolation)
    return dense, ends, segment_scores(rm_values, ends)


def end_penalty_rewards(dense, mask, stopped, penalty, max_len):
    """The "end penalty" of the authors' Llama-3.1-Instruct segment run: a response without an
    end token, or longer than max_len tokens, gets `penalty` at every token instead."""
    penalized = ~stopped | (mask.sum(-1) > max_len)
    return torch.where(penalized[:, None], penalty * mask.float(), dense)


def length_normalized_rewards(dense, mask):
    """The authors' Llama-3-SFT token-level run: every token reward divided by the response
    length, so a response's rewards sum to its mean token reward."""
    return dense / mask.sum(-1, keepdim=True).clamp(min=1)


def kl_penalized_rewards(dense, logprobs, ref_logprobs, mask, beta):
    """R_t = clamp(r_t, -10, 10) - beta (log pi - log pi_ref); also the (B, T) KL estimate."""
    kl = (logprobs - ref_logprobs) * mask
    return dense.clamp(-10, 10) - beta * kl, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """(B, T) -> advantages, returns, by generalized advantage estimation:
        delta_t = r_t + gamma V_{t+1} - V_t,     A_t = delta_t + gamma lam A_{t+1}.

    Unrolled, A_t = sum_{u >= t} (gamma lam)^(u - t) delta_u: a matrix product with the (T, T)
    upper-triangular matrix D[t, u] = (gamma lam)^(u - t), instead of a Python loop over tokens.
    """
    mask = mask.float()
    next_values = F.pad((values * mask)[:, 1:], (0, 1))  # V after the last token is 0 (terminal)
    deltas = (rewards + gamma * next_values - values) * mask
    t = torch.arange(rewards.shape[1], device=rewards.device)
    lag = (t[None, :] - t[:, None]).float()  # (T, T): lag[t, u] = u - t
    discount = torch.where(lag >= 0, (gamma * lam) ** lag.clamp(min=0), 0.0)
    advantages = deltas @ discount.T
    return advantages * mask, (advantages + values) * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def sequence_mean(x, mask):
    """Mean over each sequence's tokens, then over the sequences: every response weighs the same
    however long it is (a plain token mean over the batch lets long responses dominate)."""
    return ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def masked_var(x, mask):
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def whiten(x, mask, all_sum=lambda t: t):
    """(x - mean) / std over the masked entries of the rollout batch. `all_sum` sums a tensor
    over the data-parallel processes, so each process whitens its share with the statistics of
    the whole batch, as one process holding all of it would."""
    n = all_sum(mask.sum()).clamp(min=1)
    mean = all_sum((x * mask).sum()) / n
    var = all_sum(((x - mean) ** 2 * mask).sum()) / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def logprobs_of(logits, tokens, temperature):
    """Log-probabilities of `tokens` under the distribution they were sampled from."""
    # Implementation detail: the sampling distribution is softmax(logits / temperature).
    log_p = torch.log_softmax(logits.float() / temperature, -1)
    return log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """Clipped surrogate max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), ratio = pi / pi_old,
    averaged over each response's tokens, then over the responses."""
    ratio = (logprobs - old_logprobs).exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    return sequence_mean(torch.max(pg_loss1, pg_loss2), mask)


def value_loss(values, old_values, returns, mask, clip):
    """Clipped value loss 0.5 max((V - R)^2, (V_clipped - R)^2), the new value kept within
    `clip` of the value at rollout time; averaged like the policy loss."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    squared = torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    return 0.5 * sequence_mean(squared, mask)


# ----------------------------------------------------------------------------------------------
# Training the segment reward model (sections 1-3): cached reference entropies, Bradley-Terry on
# segment scores, held-out accuracy each epoch, and the location-aware normalizer fitted at the end.


def train_rm(args):
    accelerator = make_accelerator(args)
    model_path = model_folder(args.model) if args.model else toy_sft_model()
    check_model_dir(model_path)
    tokenizer = load_tokenizer(model_path)
    ds = rm_pairs(args, tokenizer)
    if not 0 < args.eval_size < len(ds):
        fail(f"--eval-size {args.eval_size} must be between 1 and the {len(ds)} usable pairs - 1")
    prepare_output_dir(args, "train-rm", accelerator, [model_path, args.dataset])
    model, optimizer, scheduler, train_loader, eval_loader, split = rm_setup(
        args, accelerator, model_path, tokenizer, ds
    )
    # Where training stands: optimizer steps, epoch, batches done in it, the epoch's loss so far.
    state = resume_state(accelerator, args, step=0, epoch=0, batch=0, loss_sum=0.0)
    step, per_epoch = state["step"], len(train_loader)
    done_before = state["epoch"] * per_epoch + state["batch"]
    bar = tqdm(total=args.epochs * per_epoch, initial=done_before, desc="train-rm", disable=quiet())
    model.train()
    for epoch in range(state["epoch"], args.epochs):
        done = state["batch"] if epoch == state["epoch"] else 0
        loss_sum = torch.tensor(state["loss_sum"] if done else 0.0, device=accelerator.device)
        start = time.perf_counter()
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, done) if done else train_loader
        for i, batch in enumerate(batches, start=done + 1):
            with accelerator.accumulate(model):
                _, _, scores = rm_forward(model, batch, args.entropy_threshold)
                chosen, rejected = scores.chunk(2)  # chosen rows first, then rejected
                loss = bradley_terry_loss(chosen, rejected)
                loss_sum += loss.detach()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    check_finite(accelerator, loss_sum, "loss", step + 1, args)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            bar.update()
            step += accelerator.sync_gradients
            if accelerator.sync_gradients and args.save_every and step % args.save_every == 0:
                where = {"step": step, "epoch": epoch, "batch": i, "loss_sum": loss_sum.item()}
                save_checkpoint(accelerator, args, where)
            if bar.n % 20 == 0:  # a host sync only now and then
                bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = {"epoch": epoch + 1, "step": step, "processes": accelerator.num_processes}
        metrics["rm/loss"] = accelerator.reduce(loss_sum, "mean").item() / per_epoch
        metrics["time/epoch_s"] = time.perf_counter() - start
        metrics.update(evaluate_rm(model, eval_loader, args.entropy_threshold, accelerator))
        log_metrics(args, accelerator, metrics)
        if accelerator.is_main_process:
            bar.write(json.dumps(metrics))
    save_reward_model(args, accelerator, model, tokenizer, model_path, split["train"], eval_loader)
    result = {
        "eval_accuracy": round(metrics["rm/accuracy"], 4),
        "rm/loss": round(metrics["rm/loss"], 4),
        "segment/per_response": round(metrics["segment/per_response"], 2),
    }
    result.update(toy_rm_report(args, accelerator, model_path, tokenizer))  # the toy only
    finish_run(args, accelerator)
    return {**result, "output_dir": args.output_dir, "entropy_threshold": args.entropy_threshold}


def resume_state(accelerator, args, **start):
    """The newest checkpoint's state with --resume (when there is one), else `start`."""
    return (load_checkpoint(accelerator, args) if args.resume else None) or start


def rm_setup(args, accelerator, model_path, tokenizer, ds):
    """Reference entropies (cached), train / eval split, loaders, the value model and optimizer."""
    bandit = math.isinf(args.entropy_threshold)
    ds = ds if bandit else add_entropies(ds, args, accelerator, model_path, tokenizer)
    split = ds.train_test_split(test_size=args.eval_size, seed=args.seed)
    collate = pair_collate(tokenizer.pad_token_id, bandit)
    batch = args.batch_size // args.grad_accum
    # The loader gets its own generator, not the global RNG (see ppo_setup).
    train_loader = torch.utils.data.DataLoader(
        split["train"], batch, shuffle=True, collate_fn=collate, generator=torch.Generator()
    )
    eval_loader = torch.utils.data.DataLoader(split["test"], batch, collate_fn=collate)
    set_seed(args.seed)  # the head's random init must not depend on what ran before in the process
    model = load_model(model_path, "value", args.bf16 and args.lora_rank > 0)
    model = trainable(init_head(model, args.head_init), args, "value")
    steps = args.epochs * math.ceil(len(train_loader) / args.grad_accum)
    optimizer, scheduler = make_optimizer(model, args, steps)
    prepared = accelerator.prepare(model, optimizer, train_loader, eval_loader, scheduler)
    model, optimizer, train_loader, eval_loader, scheduler = prepared
    return model, optimizer, scheduler, train_loader, eval_loader, split


def init_head(model, how, critic=False):
    """A fresh scalar head. "authors": N(0, 1 / (H + 1)) for hidden size H, as the authors start
    the reward model's and the critic's, small whatever the width. "model": the model's own
    initialization for the reward model, zeros for the critic (the toy's tuned default)."""
    head = unwrap(model).score.weight
    if how == "authors":
        torch.nn.init.normal_(head, std=1 / (unwrap(model).config.hidden_size + 1))
    elif critic:
        torch.nn.init.zeros_(head)
    return model


def rm_forward(model, batch, threshold):
    """Per-token values, segment ends and segment scores of a (2B, T) pair batch."""
    values = token_values(model, batch["input_ids"], batch["attention_mask"])
    ends = segment_ends(batch["entropy"], batch["content_mask"], threshold)
    return values, ends, segment_scores(values, ends)


@torch.no_grad()
def evaluate_rm(model, loader, threshold, accelerator):
    """Held-out accuracy, mean chosen / rejected score, segments per response and their length."""
    model.eval()
    sums = {"right": 0.0, "chosen": 0.0, "rejected": 0.0, "ends": 0.0, "tokens": 0.0, "pairs": 0.0}
    for batch in loader:
        _, ends, scores = rm_forward(model, batch, threshold)
        chosen, rejected = scores.chunk(2)
        sums["right"] += (chosen > rejected).float().sum()
        sums["chosen"] += chosen.sum()
        sums["rejected"] += rejected.sum()
        sums["ends"] += ends.sum()
        sums["tokens"] += batch["content_mask"].sum()
        sums["pairs"] += len(chosen)
    s = reduce_dict(accelerator, sums, "sum")
    model.train()
    return {
        "rm/accuracy": s["right"] / s["pairs"],
        "rm/chosen_score": s["chosen"] / s["pairs"],
        "rm/rejected_score": s["rejected"] / s["pairs"],
        "segment/per_response": s["ends"] / (2 * s["pairs"]),
        "segment/mean_length": s["tokens"] / max(s["ends"], 1),
    }


@torch.no_grad()
def collect_segment_rewards(model, loader, threshold, accelerator):
    """Score every response in `loader`: 1-D segment positions and rewards, (N,) scores."""
    model.eval()
    positions, rewards, scores = [], [], []
    for batch in loader:  # plain gather: gather_for_metrics would cut a 2B-row pair batch to B
        values, ends, score = rm_forward(model, batch, threshold)
        pad = accelerator.pad_across_processes
        pos = accelerator.gather(pad(segment_positions(ends), dim=1))
        val = accelerator.gather(pad(values * ends, dim=1))
        positions.append(pos[pos > 0].cpu())
        rewards.append(val[pos > 0].cpu())
        scores.append(accelerator.gather(score).cpu())
    model.train()
    return torch.cat(positions), torch.cat(rewards), torch.cat(scores)


def normalizer_settings(positions, rewards, scores, responses):
    """What PPO needs to normalize: the location-aware fit, and the scalar mean / std (bandit)."""
    return {
        "normalizer": list(fit_location_normalizer(positions, rewards)),
        "min_position": positions.min().item(),
        "mean": scores.mean().item(),
        "std": scores.std().item(),
        "norm_samples": responses,
    }


def save_reward_model(args, accelerator, model, tokenizer, model_path, train_ds, eval_loader):
    """Fit the location-aware normalizer on (a sample of) the training responses and take the
    bandit's mean and std on the held-out split, as the authors do; save model and settings."""
    n = min(args.norm_samples or len(train_ds), len(train_ds))
    collate = pair_collate(tokenizer.pad_token_id, math.isinf(args.entropy_threshold))
    batch = args.batch_size // args.grad_accum
    loader = torch.utils.data.DataLoader(train_ds.select(range(n)), batch, collate_fn=collate)
    loader = accelerator.prepare(loader)
    positions, rewards, _ = collect_segment_rewards(
        model, loader, args.entropy_threshold, accelerator
    )
    scores = collect_segment_rewards(model, eval_loader, args.entropy_threshold, accelerator)[2]
    save_model(accelerator, model, tokenizer, args.output_dir)
    settings = {
        "entropy_threshold": args.entropy_threshold,
        "reference_model": model_path,
        "end_token": args.end_token or tokenizer.eos_token,
        **normalizer_settings(positions, rewards, scores, 2 * n),
    }
    if accelerator.is_main_process:
        write_rm_settings(args.output_dir, settings)


def fit_norm(args):
    """Fit (or refit) the normalizer of an existing reward model. The settings are written only
    once everything succeeded: in place (the previous file kept as .bak) or, with --output-dir,
    into a copy of the reward model."""
    accelerator = make_accelerator(args)
    settings = load_rm_settings(args.reward_model)
    threshold = settings["entropy_threshold"]
    ref_path = reference_model(args, settings)
    tokenizer = load_tokenizer(args.reward_model)
    check_model_dir(args.reward_model, kind="reward")
    check_writable(args.plot, "--plot")
    args.end_token = args.end_token or settings["end_token"]
    ds = rm_pairs(args, tokenizer)
    in_place = os.path.realpath(args.output_dir) == os.path.realpath(args.reward_model)
    if not in_place:
        inputs = [args.reward_model, ref_path, args.dataset]
        prepare_output_dir(args, "fit-norm", accelerator, inputs)
    elif accelerator.is_main_process:  # no two runs at once on one reward model either
        args.final_dir = args.output_dir
        take_lock(args.output_dir + ".lock")
    ds = ds.select(range(min(args.norm_samples or len(ds), len(ds))))  # entropies of just these
    if not math.isinf(threshold):
        ds = add_entropies(ds, args, accelerator, ref_path, tokenizer)
    collate = pair_collate(tokenizer.pad_token_id, math.isinf(threshold))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=collate)
    loader = accelerator.prepare(loader)
    model = load_model(args.reward_model, "value", args.bf16).to(accelerator.device)
    positions, rewards, scores = collect_segment_rewards(model, loader, threshold, accelerator)
    fitted = normalizer_settings(positions, rewards, scores, len(scores))
    if not all(math.isfinite(v) for v in [*fitted["normalizer"], fitted["mean"], fitted["std"]]):
        fail(f"the fit on {len(scores)} responses is not finite; pass a larger --norm-samples")
    if len(scores) < 1000:
        print(f"warning: the normalizer rests on only {len(scores)} responses", file=sys.stderr)
    settings.update(fitted, reference_model=ref_path)
    if accelerator.is_main_process:
        if args.plot:  # first: a failing plot leaves the settings as they were
            try:
                plot_normalizer(args.plot, positions, rewards, settings["normalizer"])
            except (OSError, ValueError, ImportError) as e:
                fail(f"--plot {args.plot}: {e}; the settings were left as they were")
        if not in_place:
            copy_model_files(args.reward_model, args.output_dir)
        write_rm_settings(args.output_dir, settings, backup=in_place)
    if not in_place:
        finish_run(args, accelerator)
    keys = ("normalizer", "mean", "std", "norm_samples")
    return {**{k: settings[k] for k in keys}, "output_dir": args.output_dir}


def copy_model_files(src, dst):
    """The files of a model folder (not its run records, caches or checkpoints) into dst."""
    skip = ("args.json", "metrics.jsonl", SETTINGS_FILE, SETTINGS_FILE + ".bak")
    for name in os.listdir(src):
        path = os.path.join(src, name)
        if os.path.isfile(path) and name not in skip and not name.startswith("entropy-"):
            shutil.copy2(path, os.path.join(dst, name))


# ----------------------------------------------------------------------------------------------
# PPO against dense segment rewards (sections 4-5). Each iteration: sample a rollout batch and
# score it (one reference forward gives both the KL log-probs and the segmenting entropies), GAE,
# whitened advantages, epochs of clipped mini-batch updates, one metrics row.


def ppo(args):
    run = ppo_setup(args)
    accelerator, policy, critic, loader = run.accelerator, run.policy, run.critic, run.loader
    state = load_checkpoint(accelerator, args) if args.resume else None
    if state is None:
        state = {"step": 0, "before": evaluate_policy(run, args)}
    before, metrics = state["before"], state.get("metrics", {})
    bar = tqdm(range(state["step"], args.steps), desc="ppo", disable=quiet())
    for step in bar:
        start = time.perf_counter()
        epoch, i = divmod(step, len(loader))  # a pass over the prompts is an epoch of the loader
        if i == 0 or step == state["step"]:
            loader.set_epoch(epoch)
            batches = iter(accelerator.skip_first_batches(loader, i) if i else loader)
        batch = next(batches)
        # 1. Rollout: sample, then score: old log-probs, values, dense rewards, KL, advantages.
        policy.eval()
        critic.eval()
        chunks = zip(*(batch[k].split(args.rollout_chunk) for k in ("input_ids", "attention_mask")))
        parts = [rollout(run, ids, mask, args) for ids, mask in chunks]
        data = {k: cat_padded([part[k] for part in parts]) for k in parts[0]}
        check_finite(accelerator, data["dense"], "reward", step + 1, args)
        all_sum = lambda t: accelerator.reduce(t, "sum")  # noqa: E731
        data["advantages"] = whiten(data["advantages"], data["mask"], all_sum)
        # 2. Epochs of clipped mini-batch updates over the rollout batch.
        policy.train()
        critic.train()
        stats = []
        for _ in range(args.ppo_epochs):
            for idx in torch.randperm(len(data["seq"]), device=data["seq"].device).split(
                args.micro_batch
            ):
                mini = {k: v[idx] for k, v in data.items()}
                stats.append(ppo_update(run, mini, args, batch["input_ids"].shape[1], step + 1))
        run.sched_p.step()
        run.sched_c.step()
        # 3. Log: rollout statistics, losses and diagnostics, a sample now and then.
        metrics = ppo_metrics(run, data, stats, batch["prompt_text"], args)
        log_metrics(args, accelerator, {"step": step + 1, **metrics, "time/step_s": lap(start)})
        bar.set_postfix(reward=f"{metrics['ppo/reward']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
        if accelerator.is_main_process and (step + 1) % max(1, args.steps // 4) == 0:
            bar.write(sample_table(run.tokenizer, data, 0))
        if args.save_every and (step + 1) % args.save_every == 0:
            where = {"step": step + 1, "before": before, "metrics": metrics}
            save_checkpoint(accelerator, args, where)
    after = evaluate_policy(run, args)
    save_model(accelerator, policy, run.tokenizer, args.output_dir)
    finish_run(args, accelerator)
    result = {
        "reward_before": round(before["reward"], 4),
        "reward_after": round(after["reward"], 4),
    }
    if not args.dataset:
        for key in ("toy_score", "flawed_rate"):
            result[f"{key}_before"] = round(before[key], 4)
            result[f"{key}_after"] = round(after[key], 4)
    kl = round(metrics["ppo/kl"], 4)
    return {**result, "kl": kl, "reward_mode": args.reward_mode, "output_dir": args.output_dir}


@torch.no_grad()
def generate(policy, prompt_ids, prompt_mask, args, stop_ids, pad_id):
    """Sample responses. Returns prompt + response ids (`seq`) and mask (`attn`), the (B, R)
    `response`, its `mask` up to and including the first stop token, that `stop` token, and
    whether each row `stopped` at all."""
    out = unwrap(policy).generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        top_k=0,
        top_p=args.top_p,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    response = out[:, prompt_ids.shape[1] :]
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=response.device))
    # Implementation detail: everything after the first stop token is masked (padding or junk).
    mask = (is_stop.long().cumsum(-1) - is_stop.long()) == 0
    attn = torch.cat([prompt_mask, mask.long()], 1)
    stopped = is_stop.any(-1)
    return {
        "seq": out,
        "attn": attn,
        "response": response,
        "mask": mask,
        "stop": is_stop & mask,
        "stopped": stopped,
    }


@torch.no_grad()
def score_responses(run, sample, args):
    """One reference forward gives the KL log-probs and the entropies that segment the responses;
    one reward-model forward gives the segment rewards. Returns (B, R) reference log-probs and
    dense rewards, the segment ends and the raw (B,) reward-model score."""
    seq, attn, response, mask = sample["seq"], sample["attn"], sample["response"], sample["mask"]
    P = seq.shape[1] - response.shape[1]
    logits = run.ref_logits(seq, attn)
    ref_logprobs = logprobs_of(logits[:, P - 1 : -1], response, args.temperature)
    bandit = args.reward_mode == "bandit"  # one segment: no entropies needed
    entropy = torch.zeros_like(ref_logprobs) if bandit else token_entropy(logits[:, P:])
    rm_values = token_values(run.rm, seq, attn)[:, P:]
    threshold = 0.0 if args.reward_mode == "token" else run.settings["entropy_threshold"]
    norm = run.settings if args.location_norm else None
    dense, ends, score = dense_rewards(
        rm_values,
        entropy,
        mask,
        sample["stop"],
        args.reward_mode,
        threshold,
        norm,
        args.interpolation,
    )
    last = mask & (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True))
    dense = dense - args.missing_eos_penalty * (last & ~sample["stopped"][:, None])
    if args.end_penalty:
        dense = end_penalty_rewards(
            dense, mask, sample["stopped"], args.end_penalty, args.end_penalty_len
        )
    if args.length_norm:
        dense = length_normalized_rewards(dense, mask)
    return ref_logprobs, dense, ends, score


@torch.no_grad()
def rollout(run, prompt_ids, prompt_mask, args):
    """One rollout chunk: responses, old log-probs, values, rewards, advantages, returns (B, R)."""
    sample = generate(run.policy, prompt_ids, prompt_mask, args, run.stop_ids, run.pad_id)
    seq, attn, mask = sample["seq"], sample["attn"], sample["mask"]
    P = prompt_ids.shape[1]
    logits = forward(run.policy, seq, attn).logits[:, P - 1 : -1]
    old_logprobs = logprobs_of(logits, sample["response"], args.temperature)
    values = token_values(run.critic, seq, attn)[:, P - 1 : -1] * mask
    ref_logprobs, dense, ends, score = score_responses(run, sample, args)
    rewards, kl = kl_penalized_rewards(dense, old_logprobs, ref_logprobs, mask, args.beta)
    advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
    return {
        **sample,
        "mask": mask.float(),
        "old_logprobs": old_logprobs,
        "values": values,
        "advantages": advantages,
        "returns": returns,
        "score": score,
        "kl": kl.sum(-1),
        "ends": ends,
        "dense": dense,
        "stopped": sample["stopped"].float(),
    }


def ppo_update(run, batch, args, P, step):
    """One clipped policy step and one clipped value step on a mini-batch; their statistics."""
    mask = batch["mask"]
    with run.accelerator.accumulate(run.policy, run.critic):
        logits = forward(run.policy, batch["seq"], batch["attn"]).logits[:, P - 1 : -1]
        logprobs = logprobs_of(logits, batch["response"], args.temperature)
        pg_loss = policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, args.clip_eps
        )
        values = token_values(run.critic, batch["seq"], batch["attn"])[:, P - 1 : -1]
        v_loss = value_loss(values, batch["values"], batch["returns"], mask, args.value_clip)
        check_finite(run.accelerator, pg_loss + v_loss, "PPO loss", step, args)
        run.accelerator.backward(pg_loss + v_loss)  # disjoint parameters: one backward serves both
        run.accelerator.clip_grad_norm_(run.policy.parameters(), 1.0)
        run.accelerator.clip_grad_norm_(run.critic.parameters(), 1.0)
        for optimizer in (run.opt_p, run.opt_c):
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        log_ratio = logprobs - batch["old_logprobs"]
        return {
            "losses/policy": pg_loss.detach(),
            "losses/value": v_loss.detach(),
            "ppo/clipfrac": masked_mean(
                ((log_ratio.exp() - 1).abs() > args.clip_eps).float(), mask
            ),
            "ppo/entropy": masked_mean(token_entropy(logits.float() / args.temperature), mask),
            # k3 estimator of KL(old || new): E[(r - 1) - log r], r = pi_new / pi_old, always >= 0
            "ppo/approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask),
            "ppo/value_clipfrac": masked_mean(
                ((values - batch["values"]).abs() > args.value_clip).float(), mask
            ),
        }


def ppo_metrics(run, data, stats, prompts, args):
    """One metrics row, averaged over the processes: rollout, losses, diagnostics, toy score."""
    mask, ends = data["mask"], data["ends"].float()
    residual = masked_var(data["returns"] - data["values"], mask)
    m = {
        "ppo/reward": data["score"].mean(),
        "ppo/kl": data["kl"].mean(),
        "ppo/response_length": mask.sum(-1).mean(),
        "segment/per_response": ends.sum(-1).mean(),
        "segment/mean_length": mask.sum() / ends.sum().clamp(min=1),
        "ppo/stopped": data["stopped"].mean(),
        **{k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]},
        # explained variance of the critic: 1 - Var(returns - values) / Var(returns)
        "ppo/explained_variance": 1 - residual / masked_var(data["returns"], mask).clamp(min=1e-8),
    }
    if not args.dataset:  # the exact checker exists for the toy task only
        texts = decode_responses(run.tokenizer, data["response"], mask, data["stop"])
        toy = [toy_score(p, t) for p, t in zip(prompts, texts)]
        m["ppo/toy_score"] = torch.tensor(sum(toy) / len(toy), device=mask.device)
    return {**reduce_dict(run.accelerator, m, "mean"), "processes": run.accelerator.num_processes}


@torch.no_grad()
def evaluate_policy(run, args):
    """Mean reward-model score, exact toy score (toy task only) and flawed rate on held-out
    prompts, with the same sampling noise before and after training."""
    torch.manual_seed(args.seed + 1)
    scores, toy = [], []
    for batch in run.eval_loader:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        sample = generate(run.policy, ids, mask, args, run.stop_ids, run.pad_id)
        score = score_responses(run, sample, args)[3]
        scores.append(run.accelerator.gather_for_metrics(score))
        texts = decode_responses(run.tokenizer, sample["response"], sample["mask"], sample["stop"])
        toy += [toy_score(p, t) for p, t in zip(batch["prompt_text"], texts)]
    out = {"reward": torch.cat(scores).mean().item()}
    if not args.dataset:
        toy = torch.tensor(run.accelerator.gather_for_metrics(toy), dtype=torch.float)
        out.update(toy_score=toy.mean().item(), flawed_rate=(toy < 1).float().mean().item())
    return out


def ppo_setup(args):
    """Everything PPO needs: prompts, the four models, optimizers, schedules, stop ids."""
    settings = ensure_reward_model(args)
    accelerator = make_accelerator(args)
    model_path = reference_model(args, settings)
    tokenizer = load_tokenizer(model_path)
    if tokenizer.get_vocab() != load_tokenizer(args.reward_model).get_vocab():
        fail(
            f"the reward model {args.reward_model} and the policy {model_path} use different "
            "tokenizers; they must share one"
        )
    tokenizer.padding_side = "left"  # Implementation detail: batched generation pads on the left
    end_id = end_token_id(tokenizer, args.end_token or settings["end_token"])
    train_ds, eval_ds = prompt_splits(args, tokenizer)
    if args.episodes > 0:
        args.steps = max(1, int(args.episodes * len(train_ds)) // args.batch_size)
    collate = prompt_collate(tokenizer)
    # The loaders get their own generator: drawing from the global RNG that sampling uses would
    # make a resumed run sample differently from an uninterrupted one. The order is set per epoch.
    loader = torch.utils.data.DataLoader(
        train_ds,
        args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator(),
    )
    eval_loader = torch.utils.data.DataLoader(eval_ds, args.rollout_chunk, collate_fn=collate)
    check_model_dir(model_path, kind="causal")
    check_model_dir(args.reward_model, kind="reward")
    inputs = [model_path, args.reward_model, args.dataset]
    prepare_output_dir(args, "ppo", accelerator, inputs)  # input checked: from here on, writes
    run = types.SimpleNamespace(accelerator=accelerator, tokenizer=tokenizer, settings=settings)
    load_ppo_models(run, args, model_path)
    run.stop_ids = stop_token_ids(run.policy, end_id)
    run.pad_id = tokenizer.pad_token_id
    run.opt_p, run.sched_p = make_optimizer(run.policy, args, args.steps)
    critic_args = dataclasses.replace(args, lr=args.critic_lr)
    run.opt_c, run.sched_c = make_optimizer(run.critic, critic_args, args.steps)
    # One model per prepare call: FSDP wraps models one at a time.
    run.policy, run.opt_p = accelerator.prepare(run.policy, run.opt_p)
    run.critic, run.opt_c = accelerator.prepare(run.critic, run.opt_c)
    run.loader, run.eval_loader = accelerator.prepare(loader, eval_loader)
    accelerator.register_for_checkpointing(run.sched_p, run.sched_c)
    return run


def load_ppo_models(run, args, model_path):
    """Actor = SFT policy; critic = SFT backbone + zero head; frozen reward model; reference =
    frozen SFT policy (with LoRA: the policy with its adapters off, no second copy)."""
    frozen_bf16 = args.bf16 and args.lora_rank > 0  # LoRA: base weights never train, keep bf16
    run.policy = load_model(model_path, bf16=frozen_bf16)
    run.critic = load_model(model_path, "value", frozen_bf16)
    init_head(run.critic, args.head_init, critic=True)
    run.policy = trainable(run.policy, args, "causal")
    run.critic = trainable(run.critic, args, "value")
    device = run.accelerator.device
    run.rm = (
        load_model(args.reward_model, "value", args.bf16).eval().requires_grad_(False).to(device)
    )
    if args.lora_rank:

        def ref_logits(seq, attn):
            with unwrap(run.policy).disable_adapter():
                return forward(run.policy, seq, attn).logits

    else:
        ref = load_model(model_path, bf16=args.bf16).eval().requires_grad_(False).to(device)

        def ref_logits(seq, attn):
            return forward(ref, seq, attn).logits

    run.ref_logits = ref_logits


# ----------------------------------------------------------------------------------------------
# SFT: the toy's first stage (the paper starts from released SFT models). Loss on response tokens.


def sft(args):
    if args.save_every or args.resume:
        fail(
            "sft has no checkpoints (it is the toy's quick first stage); "
            "--save-every / --resume are for train-rm and ppo"
        )
    accelerator = make_accelerator(args)
    if args.model:
        tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    else:
        tokenizer = build_toy_tokenizer()
        model = build_toy_model(tokenizer)
    loader = sft_loader(args, tokenizer)
    total = args.epochs * math.ceil(len(loader) / args.grad_accum)
    optimizer, scheduler = make_optimizer(model, args, total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    prepare_output_dir(args, "sft", accelerator, [args.model, args.dataset])
    model.train()
    bar = tqdm(total=args.epochs * len(loader), desc="sft", disable=quiet())
    for epoch in range(args.epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                out = forward(
                    model, batch["input_ids"], batch["attention_mask"], labels=batch["labels"]
                )
                accelerator.backward(out.loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            bar.update()
            if bar.n % 20 == 0:  # a host sync only now and then
                bar.set_postfix(loss=f"{out.loss.item():.3f}")
        log_metrics(args, accelerator, {"epoch": epoch + 1, "sft/loss": out.loss.item()})
    save_model(accelerator, model, tokenizer, args.output_dir)
    finish_run(args, accelerator)
    return {"sft/loss": round(out.loss.item(), 4), "output_dir": args.output_dir}


def sft_loader(args, tokenizer):
    """SFT examples (the toy's, or a dataset's `completion` / `chosen`): labels on the response."""
    if args.dataset:
        ds = load_rows(args.dataset)
    else:
        ds = datasets.Dataset.from_list(toy_sft_rows(3000, args.flaw_rate, args.seed))
    key = next((k for k in ("completion", "chosen", "messages") if k in ds.column_names), "")
    check_columns(ds, [key or "completion"])
    end_id = end_token_id(tokenizer, args.end_token)

    def encode_row(row, i):
        prompt, response = split_conversation(row, key, tokenizer, i)
        prompt_ids, response_ids = encode(tokenizer, prompt, response, args.max_prompt_len, end_id)
        ids = (prompt_ids + response_ids)[: args.max_len]
        return {
            "input_ids": ids,
            "labels": ([-100] * len(prompt_ids) + response_ids)[: args.max_len],
        }

    def collate(rows):
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad_right(ids, tokenizer.pad_token_id),
            "labels": pad_right([r["labels"] for r in rows], -100),
            "attention_mask": pad_right([[1] * len(i) for i in ids], 0),
        }

    ds = ds.map(encode_row, with_indices=True, remove_columns=ds.column_names)
    batch = args.batch_size // args.grad_accum
    return torch.utils.data.DataLoader(ds, batch, shuffle=True, collate_fn=collate)


# ----------------------------------------------------------------------------------------------
# The embedded toy task: "Name 7 fruits." -> "Fruits: apple, cherry, fig, kiwi, lemon, mango, plum."
# Each item is right or wrong on its own and an answer has 6-8 of them: which item made an answer
# worse is what segment rewards can tell PPO and one reward per answer cannot (README: toy design
# notes).

TOY_SFT, TOY_RM, TOY_PPO = "runs/toy-sft", "runs/toy-rm", "runs/toy-ppo"
CATEGORIES = {  # six categories of 9-10 items, each one BPE token
    "fruits": "apple cherry fig grape kiwi lemon mango melon pear plum".split(),
    "colors": "beige black blue brown cyan gray green pink red white".split(),
    "animals": "bear cat cow deer dog fox goat horse lion tiger".split(),
    "tools": "axe chisel clamp drill file hammer pliers rake saw".split(),
    "metals": "brass bronze copper gold iron lead nickel silver tin".split(),
    "drinks": "beer cider cocoa coffee juice milk soda tea water wine".split(),
}
TOY_COUNTS = (6, 7, 8)
TOY_ITEM_FLAWS = {"wrong": 4, "garbled": 1, "repeat": 1}  # kind: weight, per item
TOY_FLAWS = (*TOY_ITEM_FLAWS, "count")  # and per answer: one item too many or too few
TOY_PAIR_FLAW_RATES = (0.0, 0.1, 0.2, 0.3)  # per-item flaw rates of preference answers
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


TOY_DEMO = (
    "Name 6 fruits.",
    "Fruits: apple, cherry, fig, kiwi, mango, plum.",
    "Fruits: apple, cherry, tiger, kiwi, mango, plum.",
)  # the `segment` view's default pair


def toy_prompt(rng):
    n, category = rng.choice(TOY_COUNTS), rng.choice(sorted(CATEGORIES))
    return f"Name {n} {category}.", n, category


def toy_response(rng, n, category, flaw_rate=0.0, flaws=TOY_FLAWS):
    """A right answer lists n distinct items of the category in alphabetical order (so a small
    model avoids repeats by looking at the item before). Each item is flawed with probability
    flaw_rate: 'wrong' (another category's item), 'garbled' (random letters: text that is no item
    at all, which PPO would otherwise be free to try) or 'repeat' (the item before, again). With
    probability flaw_rate the answer also has one item too many or too few ('count'). `flaws`:
    the kinds drawn."""
    k = n + (rng.choice((-1, 1)) if "count" in flaws and rng.random() < flaw_rate else 0)
    items = sorted(rng.sample(CATEGORIES[category], k))
    kinds = [f for f in flaws if f in TOY_ITEM_FLAWS]
    for i in range(k):
        if not kinds or rng.random() >= flaw_rate:
            continue
        flaw = rng.choices(kinds, [TOY_ITEM_FLAWS[f] for f in kinds])[0]
        if flaw == "repeat" and i > 0:
            items[i] = items[i - 1]
        elif flaw == "garbled":
            items[i] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))
        else:  # 'wrong', or a 'repeat' drawn for the first item
            other = rng.choice([c for c in sorted(CATEGORIES) if c != category])
            items[i] = rng.choice(CATEGORIES[other])
    return f"{category.capitalize()}: {', '.join(items)}."


def toy_item_labels(prompt, response):
    """One boolean per listed item: True for an item of the asked category that no earlier item
    repeats; None when the answer is malformed (not 'Category: item, item, ... .')."""
    ask = re.fullmatch(r"Name (\d+) (\w+)\.", prompt.strip())
    ans = re.fullmatch(r"(\w+): (\w+(, \w+)*)\.", response.strip())
    if not ask or not ans or ans.group(1) != ask.group(2).capitalize():
        return None
    items, category = ans.group(2).split(", "), CATEGORIES.get(ask.group(2), [])
    return [item in category and item not in items[:i] for i, item in enumerate(items)]


def toy_score(prompt, response):
    """Exact quality in [0, 1]: correct items / max(asked, given); 0 if malformed. Partial credit:
    each item fixed moves it by 1/n."""
    labels = toy_item_labels(prompt, response)
    if not labels:
        return 0.0
    n = int(prompt.split()[1])
    return min(sum(labels), n) / max(n, len(labels))


def toy_flaws(prompt, response):
    """Flaws of an answer, max(asked, given) - correct: a wrong item, a repeat, one too many and
    one too few each count one; inf if malformed."""
    labels, n = toy_item_labels(prompt, response), int(prompt.split()[1])
    if labels is None:
        return math.inf
    return max(n, len(labels)) - min(sum(labels), n)


def toy_segment_accuracy(tokenizer, ref, rm, rows, threshold, end_id):
    """Per-segment accuracy of a reward model, read with the checker's item labels: over every
    (flawed item, correct item) pair of one answer, how often the flawed item's segment gets the
    lower reward (0.5: blind to which item is wrong). An item's segment is the one that holds its
    last letter: " kiwi," at c = 1, the token " kiwi" at c = 0. A bandit model (c = inf) has one
    reward per answer and no per-segment reading."""
    pairs = [(r["prompt"], r[key]) for r in rows for key in ("chosen", "rejected")]
    messages = [([{"role": "user", "content": p}], r) for p, r in pairs]
    below = total = 0
    cut = cut_segments(tokenizer, ref, rm, messages, threshold, end_id)
    for (prompt, response), segments in zip(pairs, cut):
        labels = toy_item_labels(prompt, response)
        if not labels or all(labels) or not any(labels):
            continue
        # characters up to the end of each segment; an item ends before its "," or "."
        stops = list(itertools.accumulate(len(s["text"]) for s in segments))
        item_ends = [m.end() for m in re.finditer(r"\w+(?=[,.])", response)]
        rewards = [segments[bisect.bisect_left(stops, e)]["reward"] for e in item_ends]
        bad = [r for r, ok in zip(rewards, labels) if not ok]
        good = [r for r, ok in zip(rewards, labels) if ok]
        below += sum(b < g for b in bad for g in good)
        total += len(bad) * len(good)
    return below / max(total, 1)


def toy_rm_report(args, accelerator, model_path, tokenizer):
    """train-rm's per-segment report on the toy: {"segment_accuracy": toy_segment_accuracy of the
    saved reward model, read back merged and on the CPU, on fresh pairs that are the same for every
    seed}; None for a bandit model, which has no segments; {} off the toy and on other processes."""
    if args.dataset or not accelerator.is_main_process:
        return {}
    if math.isinf(args.entropy_threshold):
        msg = "segment_accuracy: none, a bandit reward model gives one reward per answer"
        print(msg, file=sys.stderr)
        return {"segment_accuracy": None}
    ref, rm = load_model(model_path).eval(), load_model(args.output_dir, "value").eval()
    end_id = end_token_id(tokenizer, args.end_token)
    rows = toy_preference_rows(args.eval_size, seed=-1)
    accuracy = toy_segment_accuracy(tokenizer, ref, rm, rows, args.entropy_threshold, end_id)
    return {"segment_accuracy": round(accuracy, 4)}


def toy_preference_rows(n, seed=0):
    """Pairs (prompt, chosen, rejected): two answers to one prompt, each with its own per-item flaw
    rate; chosen has fewer flaws (ties dropped). Both may be imperfect, so which items decide the
    preference is for the reward model to find out, as in real preference data."""
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        prompt, k, category = toy_prompt(rng)
        a, b = (toy_response(rng, k, category, rng.choice(TOY_PAIR_FLAW_RATES)) for _ in "ab")
        fa, fb = toy_flaws(prompt, a), toy_flaws(prompt, b)
        if fa != fb:
            chosen, rejected = (a, b) if fa < fb else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def toy_sft_rows(n, flaw_rate, seed=0):
    """SFT targets, each item wrong or garbled with probability flaw_rate, never a repeat or a
    wrong count: the SFT model makes mistakes at about that rate, which leaves PPO work to do, and
    rarely tries what its reward model judges worst (README: toy design notes)."""
    rng, rows = random.Random(seed + 1), []
    for _ in range(n):
        prompt, k, category = toy_prompt(rng)
        completion = toy_response(rng, k, category, flaw_rate, ("wrong", "garbled"))
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def toy_prompt_rows(n, seed=0):
    rng = random.Random(seed + 2)
    return [{"prompt": toy_prompt(rng)[0]} for _ in range(n)]


def build_toy_tokenizer():
    """A byte-level BPE trained on the toy corpus, with a chat template: toy and hub models then
    share every code path (apply_chat_template, end token, padding)."""
    rows = toy_preference_rows(2000, seed=123)
    corpus = [r["prompt"] + " " + r["chosen"] + " " + r["rejected"] for r in rows]
    special = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|end|>",
        chat_template=TOY_CHAT_TEMPLATE,
    )


def build_toy_model(tokenizer):
    """A ~0.8M-parameter Llama from a config: no download."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def toy_sft_model():
    """The toy SFT model, trained on first use."""
    if not os.path.exists(os.path.join(TOY_SFT, "config.json")):
        print(f"building the toy SFT model in {TOY_SFT} ...", file=sys.stderr)
        sft(resolve("sft", SFTArgs(overwrite=True)))
    return TOY_SFT


# ----------------------------------------------------------------------------------------------
# Plumbing from here on. Data: preference and prompt datasets in the standard and conversational
# layouts, chat template, end token appended, lengths checked, reference entropies cached.

SETTINGS_FILE = (
    "segment_rlhf.json"  # segmentation settings + normalizer, saved beside a reward model
)


def fail(msg):
    """Bad input: one clear line and a non-zero exit, never a traceback."""
    raise SystemExit(f"segment_rlhf: error: {msg}")


def load_rows(name, split="train"):
    """A hub id or a local json/jsonl/parquet file, through `datasets`."""
    ext = os.path.splitext(name)[1].lstrip(".")
    if ext in ("json", "jsonl", "parquet"):
        if not os.path.exists(name):
            fail(f"dataset file {name} does not exist")
        builder = "parquet" if ext == "parquet" else "json"
        try:
            ds = datasets.load_dataset(builder, data_files=name, split="train")
        except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError, OSError):
            # unparsable (ValueError: pyarrow's ArrowInvalid), empty, unreadable, cache unwritable
            fail(f"could not read {name}: it must hold {ext} records, one per example")
    elif os.path.isdir(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        try:
            ds = datasets.load_dataset(name, split=split)
        except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
            fail(
                f"could not load dataset {name!r} ({type(e).__name__}); pass a hub id, a "
                "directory or a .json/.jsonl/.parquet file"
            )
    else:
        fail(f"dataset {name!r} is neither a hub id (org/name) nor a .json/.jsonl/.parquet file")
    if len(ds) == 0:
        fail(f"dataset {name} has no rows")
    return ds


def split_conversation(row, key, tokenizer, index=0):
    """(prompt, response text) of a row in any of TRL's layouts: standard (`prompt` and `key`
    strings) or conversational (`key` holds the assistant's turn, after a `prompt` message list,
    or a whole conversation that ends with it). The prompt comes back as messages, or as text
    when a prompt string already ends with the chat template's assistant header (a templated
    prompt is used as it is, not wrapped in a second user turn)."""
    value, prompt = row[key], row.get("prompt")
    where = f"row {index}, column {key!r}"
    earlier, response = [], value
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            fail(f"{where}: a conversation must end with an assistant turn")
        earlier, response = value[:-1], value[-1].get("content")
    if isinstance(prompt, str) and not is_templated(prompt, tokenizer):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None or isinstance(prompt, list):
        prompt = (prompt or []) + earlier
        if not prompt:
            fail(f"{where}: a conversation needs a prompt before the assistant's turn")
        check_turns(prompt, where)
    if not isinstance(prompt, (str, list)) or not isinstance(response, str):
        fail(f"{where}: message contents must be strings")
    return prompt, response


def is_templated(text, tokenizer):
    """Whether a prompt string already ends with the chat template's assistant header."""
    header = assistant_header(tokenizer)
    return bool(header) and text.rstrip().endswith(header)


@functools.cache  # one tokenizer, one header: not two template renders for every row
def assistant_header(tokenizer):
    """What add_generation_prompt appends to a conversation, e.g. '<|assistant|>'."""
    turn = [{"role": "user", "content": "x"}]
    bare = tokenizer.apply_chat_template(turn, tokenize=False)
    ready = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return ready[len(bare) :].strip()


def implicit_prompt(chosen, rejected):
    """TRL's standard implicit layout (chosen and rejected full texts): the shared prefix, cut
    back to its last whitespace, is the prompt; the rest of each text is its response."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = max(shared.rfind(" "), shared.rfind("\n"))
    prompt = shared[:cut] if cut > 0 else ""
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def check_turns(messages, where):
    """Every turn a dict with a string role and content (the chat template needs both)."""
    for turn in messages:
        ok = isinstance(turn, dict) and all(
            isinstance(turn.get(k), str) for k in ("role", "content")
        )
        if not ok:
            fail(f"{where}: every turn needs a string 'role' and 'content', got {turn!r}")


def check_columns(ds, keys):
    """Explicit layouts need `prompt` + keys; conversational and implicit pairs need only keys."""
    missing = [k for k in keys if k not in ds.column_names]
    implicit = keys == ["chosen", "rejected"] or isinstance(ds[0][keys[0]], list)
    if missing or ("prompt" not in ds.column_names and not implicit):
        fail(
            f"dataset needs columns {['prompt', *keys]} (or conversational {keys}); "
            f"found {ds.column_names}"
        )


def encode(tokenizer, prompt, response, max_prompt_len, end_id):
    """Token ids of the prompt (messages through the chat template, or text as it is) cut from
    the left, and of the response followed by the end token (none when end_id is None)."""
    text = prompt
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_len:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids + ([] if end_id is None else [end_id])


def end_token_id(tokenizer, end_token=""):
    token = end_token or tokenizer.eos_token
    token_id = tokenizer.convert_tokens_to_ids(token) if token else None
    if token_id is None or token_id == tokenizer.unk_token_id:
        fail(f"end token {token!r} is not in the tokenizer's vocabulary; pass --end-token")
    return token_id


def pad_right(seqs, value):
    """List of id lists -> (B, T) tensor, right-padded."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


def prepare_pairs(ds, tokenizer, args, end_id):
    """Token ids of prompt / chosen / rejected; unusable pairs are skipped and counted."""
    check_columns(ds, ["chosen", "rejected"])

    def encode_row(row, i):
        if row.get("prompt") is None and all(
            isinstance(row[k], str) for k in ("chosen", "rejected")
        ):
            prompt, chosen, rejected = implicit_prompt(row["chosen"], row["rejected"])
        else:
            prompt, chosen = split_conversation(row, "chosen", tokenizer, i)
            other, rejected = split_conversation(row, "rejected", tokenizer, i)
            if other != prompt:  # a pair compares two answers to one prompt
                fail(f"row {i}: chosen and rejected have different prompts")
        prompt_ids, chosen_ids = encode(tokenizer, prompt, chosen, args.max_prompt_len, end_id)
        rejected_ids = encode(tokenizer, prompt, rejected, args.max_prompt_len, end_id)[1]
        if args.long_pairs == "truncate":  # the authors' way: cut, and end on the end token
            room = args.max_len - len(prompt_ids)
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            chosen_ids[-1] = rejected_ids[-1] = end_id
        skip = ""
        if not prompt_ids:
            skip = "no prompt (implicit layout without a shared prefix)"
        elif min(len(chosen_ids), len(rejected_ids)) < 2 or not (
            chosen.strip() and rejected.strip()
        ):
            skip = "empty response"
        elif chosen_ids == rejected_ids:
            skip = "chosen identical to rejected"
        elif len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > args.max_len:
            skip = f"longer than --max-len {args.max_len}"
        return {
            "prompt_ids": prompt_ids,
            "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids,
            "skip": skip,
        }

    ds = ds.map(encode_row, with_indices=True, remove_columns=ds.column_names)
    skipped = {reason: ds["skip"].count(reason) for reason in set(ds["skip"]) - {""}}
    if skipped:
        print(f"skipped pairs: {skipped}", file=sys.stderr)
    ds = ds.filter(lambda r: not r["skip"]).remove_columns("skip")
    if len(ds) == 0:
        fail(f"no usable preference pairs left after filtering; skipped: {skipped}")
    return ds


def rm_pairs(args, tokenizer):
    """The preference dataset (or the toy one), encoded and filtered."""
    end_id = end_token_id(tokenizer, args.end_token)
    if args.dataset:
        ds = load_rows(args.dataset)
    else:
        ds = datasets.Dataset.from_list(toy_preference_rows(2200, args.seed))
    return prepare_pairs(ds, tokenizer, args, end_id)


@torch.no_grad()
def reference_entropy(ref_model, input_ids, attention_mask, batch_size=64):
    """(N, T) entropies of the frozen reference model, one no-grad forward per example."""
    chunks = zip(input_ids.split(batch_size), attention_mask.split(batch_size))
    entropies = [token_entropy(forward(ref_model, i, m).logits) for i, m in chunks]
    return torch.cat(entropies) * attention_mask


def add_entropies_batch(rows, ref_model, pad_id, device):
    """datasets.map body: the reference entropy at every response token of chosen and rejected."""
    out = {}
    for key in ("chosen", "rejected"):
        seqs = [p + r for p, r in zip(rows["prompt_ids"], rows[f"{key}_ids"])]
        ids = pad_right(seqs, pad_id).to(device)
        mask = pad_right([[1] * len(s) for s in seqs], 0).to(device)
        ent = reference_entropy(ref_model, ids, mask).cpu()
        spans = zip(ent, rows["prompt_ids"], seqs)
        out[f"{key}_entropy"] = [e[len(p) : len(s)].tolist() for e, p, s in spans]
    return out


def cache_dir(kind):
    """$SEGMENT_RLHF_CACHE/kind (default ~/.cache/segment_rlhf/kind): caches never go into a
    model folder, which push_to_hub would upload whole."""
    home = os.path.join(os.path.expanduser("~"), ".cache", "segment_rlhf")
    path = os.path.join(os.environ.get("SEGMENT_RLHF_CACHE") or home, kind)
    os.makedirs(path, exist_ok=True)
    return path


def add_entropies(ds, args, accelerator, model_path, tokenizer):
    """Reference entropies for every pair, cached on disk with the data: segmentation depends only
    on the frozen reference model, so it costs one forward per example for the whole run."""
    # The cache key: the encoded data's fingerprint and the reference model (a retrained one too).
    local = os.path.isdir(model_path)
    stamp = os.path.getmtime(os.path.join(model_path, "config.json")) if local else 0
    key = json.dumps([ds._fingerprint, os.path.abspath(model_path) if local else model_path, stamp])
    name = f"entropy-{hashlib.sha1(key.encode()).hexdigest()[:16]}.arrow"
    cache = os.path.join(cache_dir("entropy"), name)
    with accelerator.main_process_first():  # the main process computes, the others read its file
        ref = None
        if not os.path.exists(cache):
            ref = load_model(model_path, "causal", args.bf16).to(accelerator.device).eval()
        return ds.map(
            lambda rows: add_entropies_batch(rows, ref, tokenizer.pad_token_id, accelerator.device),
            batched=True,
            batch_size=64,
            cache_file_name=cache,
            new_fingerprint=name,
            load_from_cache_file=True,
            desc="reference entropies",
        )


def pair_collate(pad_id, bandit):
    """Chosen rows then rejected rows in one (2B, T) batch. Content = the response minus its end
    token, except for the bandit, whose one segment is read at the end token itself."""

    def collate(rows):
        prompts = [r["prompt_ids"] for r in rows] * 2
        responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        seqs = [p + r for p, r in zip(prompts, responses)]
        start = torch.tensor([len(p) for p in prompts])[:, None]
        stop = torch.tensor([len(s) for s in seqs])[:, None] - (0 if bandit else 1)
        pos = torch.arange(max(len(s) for s in seqs))
        batch = {
            "input_ids": pad_right(seqs, pad_id),
            "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
            "content_mask": (pos >= start) & (pos < stop),
        }
        if "chosen_entropy" in rows[0]:
            ents = [r["chosen_entropy"] for r in rows] + [r["rejected_entropy"] for r in rows]
            ents = [[0.0] * len(p) + e for p, e in zip(prompts, ents)]
            batch["entropy"] = pad_right(ents, 0.0)
        else:
            batch["entropy"] = torch.zeros(batch["input_ids"].shape)  # bandit: not needed
        return batch

    return collate


def prompt_rows(ds, tokenizer, max_prompt_len):
    """Prompt ids and text of each row: a `prompt` column (text or messages), or a conversation
    (`chosen` / `messages`) minus its last assistant turn; cut from the left."""
    key = next((k for k in ("prompt", "chosen", "messages") if k in ds.column_names), None)
    if key is None:
        fail(
            "prompt dataset needs a 'prompt' column or a conversational 'chosen' / 'messages'; "
            f"found {ds.column_names}"
        )

    def encode_prompt(row, i):
        value, where = row[key], f"row {i}, column {key!r}"
        if isinstance(value, list) and value and isinstance(value[-1], dict) and key != "prompt":
            if value[-1].get("role") == "assistant" and len(value) == 1:
                fail(f"row {i}: column {key!r} holds an answer without a prompt")
            value = value[:-1] if value[-1].get("role") == "assistant" else value
        if not value or not isinstance(value, (str, list)):
            fail(f"row {i}: column {key!r} must hold a prompt string or a message list")
        if isinstance(value, list):
            check_turns(value, where)
        elif not is_templated(value, tokenizer):
            value = [{"role": "user", "content": value}]
        ids = encode(tokenizer, value, "", max_prompt_len, None)[0]
        text = value if isinstance(value, str) else value[-1]["content"]
        return {"prompt_text": text, "input_ids": ids}

    return ds.map(encode_prompt, with_indices=True, remove_columns=ds.column_names)


def prompt_splits(args, tokenizer):
    """Toy prompts or a dataset's, chat-formatted; the last --eval-prompts rows are held out."""
    if args.dataset:
        ds = load_rows(args.dataset)
    else:  # toy: training prompts follow --seed; the held-out ones are the same for every seed
        rows = toy_prompt_rows(20 * args.batch_size, args.seed)
        ds = datasets.Dataset.from_list(rows + toy_prompt_rows(args.eval_prompts, seed=-1))
    ds = prompt_rows(ds, tokenizer, args.max_prompt_len)
    if len(ds) <= args.eval_prompts + args.batch_size:
        fail(
            f"{len(ds)} prompts: need more than --eval-prompts ({args.eval_prompts}) + "
            f"--batch-size ({args.batch_size})"
        )
    n_train = len(ds) - args.eval_prompts
    return ds.select(range(n_train)), ds.select(range(n_train, len(ds)))


def prompt_collate(tokenizer):
    def collate(rows):
        ids = tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt")
        return {**ids, "prompt_text": [r["prompt_text"] for r in rows]}

    return collate


def cat_padded(tensors):
    """Concatenate rollout chunks along the batch, right-padding (B, T) tensors with 0."""
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tensors])


def decode_responses(tokenizer, response, mask, stop):
    rows = zip(response, mask, stop)
    return [tokenizer.decode(r[m.bool() & ~s], skip_special_tokens=True) for r, m, s in rows]


# ----------------------------------------------------------------------------------------------
# Models: loading with dropout off, forward with position ids, LoRA, optimizer, saving.


def model_folder(path):
    """A model directory or hub id as it is; a .gguf file converted once into a plain folder."""
    if path.endswith(".gguf"):
        return gguf_folder(path)
    if not os.path.isdir(path) and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        fail(f"model {path!r} does not exist (pass a directory or a hub id like org/name)")
    return path


def gguf_folder(path):
    """A GGUF checkpoint (llama.cpp's format) as a transformers folder in the cache, converted on
    first use: transformers reads GGUF (with the `gguf` package) into an ordinary model with its
    tokenizer and chat template, but will not save it as loaded, so the folder is written once
    without the GGUF marking and every later load is a plain from_pretrained."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        fail(f"model file {path!r} does not exist")
    stamp = f"{path}:{os.path.getsize(path)}:{os.path.getmtime(path)}"
    name = os.path.basename(path)[: -len(".gguf")]
    folder = os.path.join(
        cache_dir("gguf"), f"{name}-{hashlib.sha1(stamp.encode()).hexdigest()[:12]}"
    )
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        fail(f"{path} is a GGUF file: reading it needs the gguf package (pip install gguf)")
    print(f"converting {path} into {folder} (once) ...", file=sys.stderr)
    where, file = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)  # the weights are plain float32 already
    tmp = f"{folder}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_dir(path, kind="backbone"):
    """A local model folder, checked before any run directory is written: a readable config and
    complete weights (safetensors headers are read, not the tensors). kind 'causal': not a reward
    model (its LM head was never trained); 'reward': holds the scalar head `score.weight`, which
    from_pretrained would otherwise fill with random values, giving random rewards."""
    path = model_folder(path)
    if not os.path.isdir(path):
        return  # a hub id: from_pretrained checks it
    config = read_json(os.path.join(path, "config.json"), "model config")
    value_model = any("ForSequenceClassification" in a for a in config.get("architectures") or [])
    if kind == "causal" and (value_model or os.path.exists(os.path.join(path, SETTINGS_FILE))):
        fail(f"{path} is a reward / value model; --model needs the SFT (causal LM) model")
    names = weight_names(path)
    heads = [n for n in names or [] if n.split(".")[-2:] == ["score", "weight"]]
    if kind == "reward" and names is not None and not heads:
        other = [n for n in names if "head" in n and "lm_head" not in n]
        found = f" (found {', '.join(other)}: rename it to score.weight)" if other else ""
        fail(f"reward model {path} has no scalar head score.weight in its weights{found}")


def weight_names(path):
    """Tensor names of a model folder's weights (None for .bin files), failing on missing or
    damaged files."""
    files = [name for name in WEIGHTS if os.path.isfile(os.path.join(path, name))]
    if not files:
        fail(f"model {path} has no weights ({', '.join(WEIGHTS)}); is the folder complete?")
    if files[0].endswith(".bin"):
        return None  # reading names would load the tensors
    if files[0].endswith(".index.json"):
        index = read_json(os.path.join(path, files[0]), "weights index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            fail(f"the weights index {os.path.join(path, files[0])} has no weight_map")
        for shard in sorted(set(weight_map.values())):
            safetensors_names(os.path.join(path, shard))
        return list(weight_map) if files[0].startswith("model.") else None
    return safetensors_names(os.path.join(path, files[0]))


def safetensors_names(file):
    if not file.endswith(".safetensors"):
        if not os.path.isfile(file):
            fail(f"weights file {file} is missing; is the folder complete?")
        return None
    try:
        with safe_open(file, "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        fail(f"could not read the weights {file} ({e}); it is damaged or truncated: copy it again")


def load_tokenizer(path):
    path = model_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"could not load a tokenizer from {path!r}: {str(e).splitlines()[0]}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad == eos is fine: masks mark the padding
    if tokenizer.chat_template is None:
        fail(f"tokenizer of {path!r} has no chat template; use an instruct/SFT model")
    return tokenizer


def load_model(path, kind="causal", bf16=False):
    """kind: 'causal' (policy, reference) or 'value' (backbone + linear head -> 1, no bias:
    reward model and critic, the layout of AutoModelForSequenceClassification(num_labels=1))."""
    path = model_folder(path)
    check_model_dir(path)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    try:
        config = AutoConfig.from_pretrained(path, num_labels=1)
        for key, value in config.to_dict().items():
            # Implementation detail: dropout off, else log-probs and values are noisy.
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
        dtype = torch.bfloat16 if bf16 else torch.float32
        model = auto.from_pretrained(path, config=config, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as e:
        fail(f"could not load model {path!r}: {str(e).splitlines()[0]}")
    if model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos if isinstance(eos, int) else 0
    return model


def forward(model, input_ids, attention_mask, **kwargs):
    """One forward with position ids from the attention mask, so left- and right-padded rows
    agree; no KV cache (training and scoring never reuse it)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **kwargs,
    )


def unwrap(model):
    """The model inside a DDP / accelerate wrapper."""
    return getattr(model, "module", model)


def stop_token_ids(policy, end_id):
    """The end token and every eos id of the generation config (an id, a list, or None)."""
    eos = unwrap(policy).generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return sorted({end_id, *eos})


def trainable(model, args, kind):
    """Gradient checkpointing and LoRA adapters (peft) when asked for. LoRA on a value model also
    trains its scalar head (peft's SEQ_CLS task keeps `score` trainable)."""
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        task = "CAUSAL_LM" if kind == "causal" else "SEQ_CLS"
        config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_alpha,
            target_modules=args.lora_targets,
            task_type=task,
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # e.g. target modules the model does not have
            fail(f"--lora-targets {args.lora_targets}: {str(e).splitlines()[0]}")
        for p in model.parameters():  # base weights stay frozen (bf16); what trains is fp32
            p.data = p.data.float() if p.requires_grad else p.data
    return model


def make_optimizer(model, args, total_steps):
    """AdamW with the paper's betas (0.9, 0.95), linear warm-up, then cosine decay to
    --min-lr-ratio x --lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = math.ceil(args.warmup_ratio * total_steps)
    floor = {"min_lr_rate": args.min_lr_ratio}
    scheduler = get_scheduler(
        "cosine_with_min_lr", optimizer, warmup, total_steps, scheduler_specific_kwargs=floor
    )
    return optimizer, scheduler


def save_model(accelerator, model, tokenizer, output_dir):
    """save_pretrained output: loads with the standard Auto classes."""
    state_dict = accelerator.get_state_dict(model)  # every process: FSDP gathers its shards here
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        if hasattr(model, "merge_and_unload"):  # LoRA: merge the adapters into plain weights
            model, state_dict = model.merge_and_unload(), None
        # Written aside, then moved in: a failed save (disk full) leaves no half-written weights.
        tmp = os.path.join(output_dir, "model.tmp")
        try:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
            os.rmdir(tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            last = latest_checkpoint(output_dir) or "none (pass --save-every N to keep some)"
            fail(f"could not save the model in {output_dir} ({e}); last checkpoint: {last}")
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Runs: accelerate set-up, output directories, metrics, checkpoints and resuming.


def make_accelerator(args):
    if args.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        fail("--bf16: this GPU has no bf16 support; drop --bf16")
    # --batch-size is global (split_batches). The data order is a function of (seed, epoch), so a
    # resumed run sees the same batches. cpu=True without a GPU lets torchrun run DDP over gloo.
    data = DataLoaderConfiguration(
        split_batches=True, use_seedable_sampler=True, data_seed=args.seed
    )
    accelerator = Accelerator(
        mixed_precision="bf16" if args.bf16 else "no",
        gradient_accumulation_steps=args.grad_accum,
        cpu=not torch.cuda.is_available(),
        dataloader_config=data,
    )
    set_seed(args.seed)
    return accelerator


def quiet():
    """Progress bars on the main process of each machine only."""
    return int(os.environ.get("LOCAL_RANK", "0")) != 0


def lap(start):
    return time.perf_counter() - start


def reduce_dict(accelerator, values, op):
    """{name: scalar tensor or number} -> {name: float}, summed or averaged over processes in
    one collective call (one host sync)."""
    device = accelerator.device
    stacked = torch.stack(
        [torch.as_tensor(v, dtype=torch.float, device=device) for v in values.values()]
    )
    return dict(zip(values, accelerator.reduce(stacked, op).tolist()))


def prepare_output_dir(args, command, accelerator, inputs=()):
    """Claim the run directory; every check runs before anything is written. Never a directory
    the script did not write, nor one that is or holds an input; an unfinished run (checkpoints)
    goes on only with --resume and its own flags; a finished one is replaced only once the new
    run is complete: the new run is written to OUT.incomplete and renamed in finish_run."""
    final, staged = args.output_dir, args.output_dir + ".incomplete"
    saved = run_args(args, command)
    for path in inputs:
        if path and os.path.exists(path) and overlaps(final, path):
            fail(f"--output-dir {final} would overwrite the input {path}; pass another one")
    if args.resume and os.path.isfile(os.path.join(staged, "args.json")):
        run_dir_mode(staged, saved, args)  # an interrupted replacement: go on with it
        work = staged
    elif run_dir_mode(final, saved, args) == "replace":
        run_dir_mode(staged, saved, args)  # an abandoned earlier attempt may be cleared, no more
        if os.path.exists(final + ".replaced") and not ours(final + ".replaced"):
            fail(f"{final}.replaced is in the way (not written by segment_rlhf.py); move it")
        work = staged
    else:
        work = final
    args.final_dir, args.output_dir = final, work
    if args.resume and checkpoints(work):
        check_checkpoint(latest_checkpoint(work))
    # Every process has judged the directory as it was: only now may the main process change it
    # (else a process that looks later finds the new args.json and takes the run for a replacement).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        except OSError as e:
            fail(f"cannot create the folder of --output-dir {final}: {e.strerror}")
        take_lock(final + ".lock")
        fresh = work == staged and not args.resume
        if fresh:
            shutil.rmtree(staged, ignore_errors=True)
        args.created = fresh or not os.path.exists(work)
        try:
            os.makedirs(work, exist_ok=True)
        except OSError as e:
            fail(f"cannot create --output-dir {final}: {e.strerror}")
        write_json(os.path.join(work, "args.json"), saved)
        if not (args.resume and checkpoints(work)):  # no stale rows from an earlier attempt
            open(os.path.join(work, "metrics.jsonl"), "w").close()
    accelerator.wait_for_everyone()


def run_args(args, command):
    """The flags a run is defined by, as saved in its args.json."""
    skip = ("overwrite", "resume", "save_every", "final_dir", "created")
    return {
        "command": command,
        **{k: v for k, v in dataclasses.asdict(args).items() if k not in skip},
    }


def overlaps(a, b):
    """Whether path a is path b, or one holds the other."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([a, b]) in (a, b)


def ours(path):
    """A directory this script wrote (it has args.json), or an empty one."""
    if not os.path.isdir(path):
        return False
    return not os.listdir(path) or os.path.isfile(os.path.join(path, "args.json"))


def run_dir_mode(path, saved, args):
    """'new' (absent or empty), 'resume' or 'replace' for the run `saved` in `path`; else fail."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--output-dir {path} is a file; pass a directory")
    if not os.path.isdir(path) or not os.listdir(path):
        return "new"
    if not ours(path):
        fail(
            f"{path} is not empty and was not written by segment_rlhf.py; pass another --output-dir"
        )
    old = read_json(os.path.join(path, "args.json"), "run settings")
    if args.resume and old != saved:
        flags = [f.name for f in dataclasses.fields(args) if f.init]  # not the derived sizes
        changed = [k for k in ["command", *flags] if old.get(k) != saved.get(k)]
        diff = ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)} (was {old.get(k)})" for k in changed
        )
        fail(f"--resume: {path} was written with other flags: {diff}; rerun with its flags")
    if args.resume:
        return "resume"
    if checkpoints(path) and not args.overwrite:
        fail(
            f"{path} holds checkpoints of an unfinished run; pass --resume to continue, or "
            "--overwrite to start again"
        )
    if old != saved and not args.overwrite:
        fail(f"{path} holds a different run; pass --overwrite or another --output-dir")
    return "replace"


def take_lock(path):
    """One run per directory: a lock file holding the pid; one whose process is gone is stale."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock_owner(path)
            if pid is not None:
                fail(
                    f"{path[: -len('.lock')]} is in use by another run (process {pid}); wait for "
                    f"it, or remove {path} if that process is not ours"
                )
            continue
        except OSError as e:
            fail(f"cannot write beside --output-dir ({path}): {e.strerror}")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return
    fail(f"could not take the lock {path}; remove it if no run is using that directory")


def lock_owner(path):
    """The live process holding the lock at `path`, or None (after removing a stale lock)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    alive = pid > 0 and pid != os.getpid()  # our own pid: left by a failed run in this process
    try:
        os.kill(pid, 0) if alive else None
    except ProcessLookupError:
        alive = False
    except PermissionError:  # another user's live process
        pass
    if alive:
        return pid
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    return None


def release_lock(final_dir):
    path = final_dir + ".lock"
    try:
        with open(path) as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:
            os.remove(path)
    except OSError:
        pass


def finish_run(args, accelerator):
    """The run is complete: a staged run takes the old one's place (renamed aside, then removed),
    and the lock is released."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and args.output_dir != args.final_dir:
        aside = args.final_dir + ".replaced"
        shutil.rmtree(aside, ignore_errors=True)
        if os.path.isdir(args.final_dir):
            os.replace(args.final_dir, aside)
        os.replace(args.output_dir, args.final_dir)
        shutil.rmtree(aside, ignore_errors=True)
    accelerator.wait_for_everyone()
    args.output_dir = args.final_dir
    args.created = False
    release_lock(args.final_dir)


def close_run(args):
    """After a failed run: remove the directory it created unless a checkpoint can resume it."""
    final = getattr(args, "final_dir", "")
    if not final:
        return
    if args.created and not checkpoints(args.output_dir):
        shutil.rmtree(args.output_dir, ignore_errors=True)
    release_lock(final)


def read_json(path, what):
    """A JSON file the user may have edited or truncated: read, or one line saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"could not read the {what} {path}: {e}")
    if not isinstance(value, dict):
        fail(f"the {what} {path} must hold a JSON object")
    return value


def write_json(path, value):
    """Written under a temporary name and renamed: a crash never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def log_metrics(args, accelerator, row):
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, oldest first (a `.tmp` one was never finished)."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    steps = sorted(int(d.split("-")[1]) for d in names)
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def latest_checkpoint(output_dir):
    return (checkpoints(output_dir) or [None])[-1]


def save_checkpoint(accelerator, args, state):
    """Models, optimizers, schedulers and RNG states (accelerate's save_state) plus `state` (step,
    data position, ...), written to a temporary directory and then renamed: a crash never leaves
    half a checkpoint. Only the newest is kept."""
    path = os.path.join(args.output_dir, f"checkpoint-{state['step']}")
    last = latest_checkpoint(args.output_dir) or "none"
    try:
        accelerator.save_state(path + ".tmp")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
                state["metrics_rows"] = sum(1 for _ in f)
            write_json(os.path.join(path + ".tmp", "state.json"), state)
    except OSError as e:  # disk full, say: the last complete checkpoint is still there
        fail(f"could not write {path} ({e}); last good checkpoint: {last}")
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".tmp", path)
        for old in checkpoints(args.output_dir):
            if old != path:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, args):
    """--resume: restore the newest checkpoint and drop the metrics rows logged after it."""
    path = latest_checkpoint(args.output_dir)
    if path is None:
        print(
            f"--resume: no checkpoint in {args.output_dir}, starting from the beginning",
            file=sys.stderr,
        )
        return None
    state = check_checkpoint(path)
    try:
        accelerator.load_state(path)
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError, pickle.PickleError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        fail(f"checkpoint {path} is damaged ({first}); remove it to resume from none")
    if accelerator.is_main_process:
        metrics = os.path.join(args.output_dir, "metrics.jsonl")
        with open(metrics) as f:
            rows = f.readlines()[: state["metrics_rows"]]
        with open(metrics, "w") as f:
            f.writelines(rows)
    print(f"resumed from {path}", file=sys.stderr)
    return state


def check_checkpoint(path):
    """Before any work: the checkpoint's state and the headers of its weights are readable."""
    state = read_json(os.path.join(path, "state.json"), "checkpoint state")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("metrics_rows"), int):
        fail(f"checkpoint {path} is incomplete (state.json); remove it to resume from none")
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(path, name), "pt"):
                    pass
            except (SafetensorError, OSError) as e:
                fail(f"checkpoint {path} is damaged ({name}: {e}); remove it to resume from none")
    return state


def check_finite(accelerator, value, what, step, args):
    """Stop before a non-finite loss or reward reaches the weights (one host sync a step)."""
    if not torch.isfinite(accelerator.reduce(value.detach().float().sum(), "sum")):
        last = latest_checkpoint(args.output_dir) or "none (pass --save-every N to keep some)"
        fail(f"non-finite {what} at step {step}; last good checkpoint: {last}")


# ----------------------------------------------------------------------------------------------
# Reward model settings and the paper's presets.

# The paper's runs: model, cutoff c, end token, episodes, released reward models, the authors'
# fitted normalizers (a_mu, a_sigma, b_mu, b_sigma) at c and at c = 0, the bandit's (mean, std),
# and the reward tweaks of their runs by reward mode (see end_penalty_rewards and
# length_normalized_rewards).
PAPER_MODELS = {
    "phi3-mini": dict(
        model="microsoft/Phi-3-mini-4k-instruct",
        c=1.75,
        end_token="<|end|>",
        episodes=2,
        rm="yyqoni/Phi-3-mini-4k-instruct-{}-rm-700k",
        segment=(0.7668, 0.2569, 0.4705, 2.8339),
        token=(0.9628, 0.3796, 1.2917, 3.5006),
        bandit=(-0.5195, 2.1563),
        recipe={},
    ),
    "llama3-sft-8b": dict(
        model="RLHFlow/LLaMA3-SFT-v2",
        c=2.0,
        end_token="<|eot_id|>",
        episodes=1,
        rm="yyqoni/rlhflow-llama-3-sft-8b-v2-{}-rm-700k",
        segment=(0.8967, 0.5680, 0.8572, 4.1667),
        token=(1.7340, 0.9906, 1.3212, 5.4513),
        bandit=(-0.8164, 2.9531),
        recipe={"token": {"length_norm": True}},
    ),
    "llama31-instruct-8b": dict(
        model="meta-llama/Llama-3.1-8B-Instruct",
        c=2.0,
        end_token="<|eot_id|>",
        episodes=1,
        rm="yyqoni/meta-llama-3.1-instruct-8b-{}-rm-700k",
        segment=(0.8345, 0.4780, 0.8798, 3.7358),
        token=(1.6268, 0.6254, 0.6419, 4.9217),
        bandit=(-0.8281, 2.9375),
        recipe={"segment": {"end_penalty": -0.05}},
    ),
    # Not from the paper: its recipe sized for one small GPU or a patient CPU. No released reward
    # model: `train-rm --preset smollm2-135m` writes the one that `ppo --preset` reads. c = 3.0
    # gives this model phrase-length segments (README: a real model offline); learning rates
    # scaled up for a 135M model, not tuned.
    "smollm2-135m": dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        c=3.0,
        end_token="<|im_end|>",
        episodes=1,
        rm=None,
        recipe={},
        rm_sizes=dict(lr=1e-5, batch_size=64, max_len=1024, max_prompt_len=768),
        ppo_sizes=dict(
            lr=1e-6,
            critic_lr=1e-5,
            batch_size=256,
            mini_batch_size=32,
            grad_accum=4,
            max_prompt_len=512,
            max_new_tokens=512,
            max_len=1024,
        ),
    ),
}
PAPER_RM = dict(
    dataset="hendrydong/preference_700K",
    lr=1e-6,
    epochs=1,
    batch_size=128,
    grad_accum=16,
    max_len=2048,
    max_prompt_len=1728,
    eval_size=1000,
    norm_samples=60000,
    long_pairs="truncate",
)
PAPER_PPO = dict(
    dataset="argilla/ultrafeedback-binarized-preferences-cleaned",
    lr=5e-7,
    critic_lr=9e-6,
    batch_size=1024,
    mini_batch_size=128,
    grad_accum=16,
    ppo_epochs=1,
    max_prompt_len=1024,
    max_new_tokens=1024,
    max_len=2048,
    beta=0.01,
    missing_eos_penalty=0.0,
)
PAPER_BOTH = dict(bf16=True, gradient_checkpointing=True, min_lr_ratio=0.1, head_init="authors")


def preset_defaults(name, command):
    """Flag defaults for `command` under preset `name`."""
    if name not in PAPER_MODELS:
        fail(f"unknown --preset {name!r}; choose from {', '.join(PAPER_MODELS)}")
    m = PAPER_MODELS[name]
    common = {"model": m["model"], "end_token": m["end_token"]}
    rm = m["rm"].format("segment") if m["rm"] else f"runs/{name}-segment-rm"
    if command == "train-rm":
        sizes = {**m.get("rm_sizes", {}), "entropy_threshold": m["c"], "output_dir": rm}
        return {**PAPER_RM, **PAPER_BOTH, **common, **sizes}
    if command == "ppo":
        sizes = {**m.get("ppo_sizes", {}), "episodes": m["episodes"], "reward_model": rm}
        return {**PAPER_PPO, **PAPER_BOTH, **common, **sizes, "output_dir": f"runs/{name}-ppo"}
    return common


def released_rm_settings(path):
    """Settings of the authors' released reward models, which ship without ours: by hub id, or a
    local snapshot (a folder named after the model, or the hub cache's models--yyqoni--NAME),
    whose config's mean / std (OpenRLHF writes them there) then win over the table's."""
    for m in (m for m in PAPER_MODELS.values() if m["rm"]):
        for kind, c in (("segment", m["c"]), ("token", 0.0), ("bandit", float("inf"))):
            repo = m["rm"].format(kind)
            folder = os.path.basename(os.path.normpath(path))
            local = os.path.isdir(path)
            local &= folder == repo.split("/")[1] or "models--" + repo.replace("/", "--") in path
            if path != repo and not local:
                continue
            mean, std = m["bandit"]
            settings = {
                "entropy_threshold": c,
                "reference_model": m["model"],
                "end_token": m["end_token"],
                "mean": mean,
                "std": std,
            }
            if kind != "bandit":
                settings["normalizer"] = list(m[kind])
            config = read_json(os.path.join(path, "config.json"), "model config") if local else {}
            return {**settings, **{k: config[k] for k in ("mean", "std") if k in config}}
    return None


def released_settings_or_fail(path):
    settings = released_rm_settings(path)
    if settings is None:
        fail(
            f"reward model {path!r} has no {SETTINGS_FILE} (segmentation settings); train it "
            "with train-rm or use --preset"
        )
    return settings


def check_rm_settings(file, settings):
    """A settings file someone may have edited: the keys the commands read, numbers finite."""
    missing = [
        k for k in ("entropy_threshold", "reference_model", "end_token") if k not in settings
    ]
    if missing:
        fail(f"{file} lacks {', '.join(missing)}; retrain with train-rm or restore the file")
    if not all(isinstance(settings[k], str) for k in ("reference_model", "end_token")):
        fail(f"{file}: reference_model and end_token must be strings")
    if not is_number(settings["entropy_threshold"]) or not settings["entropy_threshold"] >= 0:
        fail(f"{file}: entropy_threshold must be a number >= 0 (inf: bandit)")
    norm = settings.get("normalizer")
    if norm is not None and not (isinstance(norm, list) and len(norm) == 4):
        fail(f"{file}: normalizer must be [a_mu, a_sigma, b_mu, b_sigma]; refit with fit-norm")
    numbers = [*(norm or []), *(settings[k] for k in ("mean", "std") if k in settings)]
    if not all(is_number(v) and math.isfinite(v) for v in numbers):
        fail(f"{file}: the normalizer holds non-finite or non-numeric values; refit with fit-norm")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_rm_settings(rm_dir, settings, backup=False):
    """Settings beside the reward model, and the same in its config.json (with mean / std at the
    top level, as OpenRLHF writes them), so the folder alone carries them. A local reference
    model is stored relative to the reward model, so a folder holding both can move; a backup
    keeps the previous settings file when asked for."""
    ref = settings["reference_model"]
    if os.path.isdir(ref):  # the absolute path too, for a reward model copied elsewhere alone
        settings = {**settings, "reference_model_was": os.path.abspath(ref)}
        ref = os.path.relpath(os.path.abspath(ref), os.path.abspath(rm_dir))
    settings = {**settings, "reference_model": ref}
    file = os.path.join(rm_dir, SETTINGS_FILE)
    if backup and os.path.exists(file):
        shutil.copy2(file, file + ".bak")
    write_json(file, settings)
    config = read_json(os.path.join(rm_dir, "config.json"), "model config")
    config.update(segment_rlhf=settings, mean=settings["mean"], std=settings["std"])
    write_json(os.path.join(rm_dir, "config.json"), config)


def reference_model(args, settings):
    """--model, else the reward model's reference model, which must be where it was."""
    path = args.model or settings["reference_model"]
    if not args.model and os.path.isabs(path) and not os.path.isdir(path):
        fail(
            f"the reference model {path} of reward model {args.reward_model} is not there "
            "(moved?); pass its new place with --model"
        )
    return path


def load_rm_settings(path):
    """Segmentation settings and normalizer of a reward model, checked: its segment_rlhf.json,
    the same under `segment_rlhf` in its config.json, or the released models' table."""
    file = os.path.join(path, SETTINGS_FILE)
    config = os.path.join(path, "config.json")
    if os.path.exists(file):
        settings = read_json(file, "reward model settings")
    elif os.path.exists(config) and "segment_rlhf" in read_json(config, "model config"):
        file, settings = config, read_json(config, "model config")["segment_rlhf"]
    else:
        return released_settings_or_fail(path)
    check_rm_settings(file, settings)
    ref = settings["reference_model"]
    if ref.startswith("."):  # stored relative to the reward model (write_rm_settings)
        ref = os.path.abspath(os.path.join(path, ref))
        where_it_was = settings.get("reference_model_was", ref)
        settings["reference_model"] = ref if os.path.isdir(ref) else where_it_was
    return settings


def planned_rm_settings(args):
    """The reward model's settings; for one not trained yet (the toy's, or the one a preset's
    train-rm writes), those it will be trained with."""
    path, preset = args.reward_model, args.preset
    if not os.path.exists(os.path.join(path, SETTINGS_FILE)):
        if path == TOY_RM:
            return {
                "entropy_threshold": RMArgs.entropy_threshold,
                "normalizer": "fitted by train-rm",
            }
        if preset and path == preset_defaults(preset, "train-rm")["output_dir"]:
            c = PAPER_MODELS[preset]["c"]
            return {"entropy_threshold": c, "normalizer": "fitted by train-rm --preset"}
    return load_rm_settings(path)


def resolve_reward(args, settings):
    """Reward mode (from the reward model's cutoff unless given) and value clip, checked."""
    c = settings["entropy_threshold"]
    bandit = math.isinf(c)
    trained = "bandit" if bandit else "token" if c == 0 else "segment"
    args.reward_mode = args.reward_mode or trained
    # Each mode's normalizer belongs to its cutoff: a segment one applied per token is wrong.
    if args.reward_mode != trained:
        fail(
            f"--reward-mode {args.reward_mode} does not fit a reward model trained with entropy "
            f"threshold {c}"
        )
    if args.location_norm and "normalizer" not in settings:
        fail(
            f"{args.reward_model} has no fitted normalizer: run fit-norm on it, or pass "
            "--no-location-norm"
        )
    if math.isnan(args.value_clip):
        args.value_clip = 0.2 if args.reward_mode == "bandit" else 0.25  # the paper's values
    recipe = PAPER_MODELS[args.preset]["recipe"] if args.preset else {}
    recipe = recipe.get(args.reward_mode, {})
    if args.length_norm is None:
        args.length_norm = recipe.get("length_norm", False)
    if math.isnan(args.end_penalty):
        args.end_penalty = recipe.get("end_penalty", 0.0)


def ensure_reward_model(args):
    """The reward model's settings; the toy reward model is trained on first use."""
    if args.reward_model == TOY_RM and not os.path.exists(os.path.join(TOY_RM, SETTINGS_FILE)):
        print(f"building the toy reward model in {TOY_RM} ...", file=sys.stderr)
        train_rm(resolve("train-rm", RMArgs(overwrite=True)))
    settings = load_rm_settings(args.reward_model)
    resolve_reward(args, settings)
    return settings


# ----------------------------------------------------------------------------------------------
# Seeing what the method sees: responses cut into their segments, shaded by reward; plots.


def segment_rewards(reward_model, conversations, model="", batch_size=16):
    """Segments and segment rewards of responses under a saved reward model, e.g.

        from segment_rlhf import segment_rewards
        answer = ("Name 6 fruits.", "Fruits: apple, fig, kiwi, lemon, mango, plum.")
        out = segment_rewards("runs/toy-rm", [answer])
        out[0]["segments"], out[0]["rewards"], out[0]["score"]

    conversations: (prompt, response) pairs or message lists ending with the assistant's turn.
    The score is the mean segment reward, what the model learned to rank by; the pooled logit
    of AutoModelForSequenceClassification reads one position and is not it. `model`: the
    reference model, when the one recorded in the settings has moved."""
    settings = load_rm_settings(reward_model)
    ref_path = model or settings["reference_model"]
    tokenizer = load_tokenizer(reward_model)
    pairs = []
    for c in conversations:
        row = {"prompt": c[0], "response": c[1]} if isinstance(c, tuple) else {"response": c}
        pairs.append(split_conversation(row, "response", tokenizer))
    ref = load_model(ref_path).eval()
    rm = load_model(reward_model, "value").eval()
    end_id = end_token_id(tokenizer, settings["end_token"])
    cut = cut_segments(tokenizer, ref, rm, pairs, settings["entropy_threshold"], end_id, batch_size)
    out = []
    for segments in cut:
        rewards = [s["reward"] for s in segments]
        text = [s["text"] for s in segments]
        score = sum(rewards) / max(len(rewards), 1)
        out.append({"segments": text, "rewards": rewards, "score": score})
    return out


@torch.no_grad()
def cut_segments(tokenizer, ref, rm, pairs, threshold, end_id, batch_size=16):
    """Each (prompt, response) cut into its segments: text, tokens, per-token entropies, the
    entropy at the segment's end and, with a reward model, its reward. end_id None: raw text
    (no end token; every token is content)."""
    out = []
    for start in range(0, len(pairs), batch_size):
        encoded = [
            encode(tokenizer, p, r, 10**9, end_id) for p, r in pairs[start : start + batch_size]
        ]
        seqs = [p + r for p, r in encoded]
        ids = pad_right(seqs, tokenizer.pad_token_id)
        mask = pad_right([[1] * len(s) for s in seqs], 0)
        entropy = reference_entropy(ref, ids, mask)
        values = None if rm is None else token_values(rm, ids, mask).tolist()
        pos = torch.arange(ids.shape[1])
        first = torch.tensor([len(p) for p, _ in encoded])[:, None]
        # content: the response, minus its end token except for the bandit (read at the end token)
        drop_end = end_id is not None and not math.isinf(threshold)
        last = torch.tensor([len(s) for s in seqs])[:, None] - int(drop_end)
        ends = segment_ends(entropy, (pos >= first) & (pos < last), threshold)
        for k in range(len(encoded)):
            row_values = None if values is None else values[k]
            row = segments_of(
                tokenizer, ids[k], entropy[k], ends[k], row_values, len(encoded[k][0])
            )
            out.append(row)
    return out


def segments_of(tokenizer, ids, entropy, ends, values, first):
    """One row's segments, from `first` (where its response starts) to each segment end."""
    stops = ends.nonzero().squeeze(1).tolist()
    entropy = entropy.tolist()
    segments = []
    for a, b in zip([first] + [s + 1 for s in stops[:-1]], stops):
        span = ids[a : b + 1].tolist()
        tokens = tokenizer.batch_decode([[t] for t in span])  # one call, not one per token
        seg = {"text": tokenizer.decode(span), "tokens": tokens}
        seg["token_entropy"] = [round(h, 3) for h in entropy[a : b + 1]]
        seg["entropy"] = round(entropy[b], 3)
        if values is not None:
            seg["reward"] = round(values[b], 3)
        segments.append(seg)
    return segments


def segment(args):
    """The `segment` subcommand: print (and draw) responses cut into their segments."""
    if args.text is not None and {args.prompt, args.response, args.dataset} != {None}:
        fail("--text and --prompt / --response / --dataset are two inputs: pass one of them")
    if args.text is not None and not args.text.strip():
        fail("--text is empty")
    check_writable(args.html, "--html")
    settings = load_rm_settings(args.reward_model) if args.reward_model else {}
    if args.reward_model:
        check_model_dir(args.reward_model, kind="reward")
    threshold = args.entropy_threshold
    if math.isnan(threshold):
        threshold = settings.get("entropy_threshold", 1.0)
    if not threshold >= 0:
        fail(f"--entropy-threshold must be >= 0, got {threshold}")
    model_path = reference_model(args, settings) if settings else args.model or toy_sft_model()
    tokenizer = load_tokenizer(model_path)
    inputs = segment_inputs(args, tokenizer)
    ref = load_model(model_path).eval()
    rm = load_model(args.reward_model, "value").eval() if args.reward_model else None
    end_id = None
    if args.text is None:
        end_id = end_token_id(tokenizer, args.end_token or settings.get("end_token", ""))
    pairs = [(prompt, response) for _, prompt, response in inputs]
    cut = cut_segments(tokenizer, ref, rm, pairs, threshold, end_id)
    if not all(cut):
        fail("the response is empty")
    views = [{"title": title, "segments": segs} for (title, _, _), segs in zip(inputs, cut)]
    for view in views:
        print(f"{view['title']}:\n{segments_terminal(view['segments'], sys.stdout.isatty())}")
    if args.html:
        with open(args.html, "w") as f:
            f.write(segments_html(views, threshold))
    brief = [
        {
            **v,
            "segments": [
                {k: s[k] for k in ("text", "entropy", "reward") if k in s} for s in v["segments"]
            ],
        }
        for v in views
    ]
    return {"entropy_threshold": threshold, "segments": brief[0]["segments"], "views": brief}


def segment_inputs(args, tokenizer):
    """[(title, prompt, response)] to show: --text, --prompt / --response, the chosen and
    rejected responses of a --dataset row side by side, or the toy's demo pair when no input at
    all is given."""
    if args.text is not None:  # raw text: no template, no end token, every token is content
        return [("text", "", args.text)]
    given = [f for f in ("dataset", "prompt", "response") if getattr(args, f) is not None]
    if args.dataset is not None and len(given) > 1:
        fail("--dataset and --prompt / --response are two inputs: pass one of them")
    if args.prompt is not None and args.response is None:
        fail("--prompt needs --response: the response is what gets segmented")
    if args.response is not None and not args.response.strip():
        fail("--response is empty")
    if args.response is not None:
        return [("response", [{"role": "user", "content": args.prompt or ""}], args.response)]
    if args.dataset is None:
        prompt, chosen, rejected = TOY_DEMO
        user = [{"role": "user", "content": prompt}]
        return [("chosen", user, chosen), ("rejected", user, rejected)]
    rows = load_rows(args.dataset)
    if not 0 <= args.row < len(rows):
        fail(f"--row {args.row} is outside the dataset's {len(rows)} rows")
    check_columns(rows, ["chosen"])
    keys = [k for k in ("chosen", "rejected") if k in rows.column_names]
    row = rows[args.row]
    return [
        (f"row {args.row}, {k}", *split_conversation(row, k, tokenizer, args.row)) for k in keys
    ]


def check_writable(path, flag):
    """Before the work: the file a command writes at its end can be written there."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        fail(f"{flag} {path} cannot be written: a folder, or its folder is missing or read-only")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        fail(f"{flag} {path} cannot be written: the file is read-only")


# The segment view's colours: white at reward 0, red below and green above, full at |r| = scale
# (the largest |reward| shown, so one page shares one scale); grey tints when there is no reward.
RED, GREEN, GREYS = (226, 92, 82), (84, 178, 106), ((236, 240, 245), (222, 228, 236))
PAGE_CSS = """
body{font:15px/1.45 system-ui,sans-serif;color:#1b1f24;margin:20px 24px;background:#fafbfc}
h1{font-size:18px;margin:0 0 4px} h2{font-size:14px;margin:0 0 2px}
.sub{color:#57606a;font-size:13px} .resp{font-size:17px} .seg{margin-right:3px}
.keys{display:flex;gap:8px 28px;align-items:flex-end;margin:10px 0 16px;font-size:12px}
.grad{width:220px;height:12px;border:1px solid #c8ccd1}
.ticks{display:flex;justify-content:space-between} .views{display:grid;gap:16px}
.view{background:#fff;border:1px solid #d8dee4;border-radius:6px;padding:12px 14px;min-width:0}
.tok{display:inline-flex;flex-direction:column;vertical-align:top;margin-bottom:6px}
.tt{white-space:pre;padding:1px 0} .end{box-shadow:inset -2px 0 #4b5563;padding-right:2px}
.bar{position:relative;height:18px;background:#fff}
.bar i{position:absolute;bottom:0;left:0;right:1px;background:#c3cad3} .bar i.hi{background:#52606f}
@media(max-width:700px){.views{grid-template-columns:1fr!important}}
"""


def segment_rgb(segment, k, scale):
    """Background of segment k: by its reward on the diverging scale, else alternating greys."""
    if segment.get("reward") is None:
        return GREYS[k % 2]
    t = min(1.0, abs(segment["reward"]) / scale)
    return tuple(round(255 + (c - 255) * t) for c in (RED if segment["reward"] < 0 else GREEN))


def reward_scale(views):
    return max((abs(s.get("reward") or 0) for v in views for s in v["segments"]), default=0) or 1


def segments_html(views, threshold):
    """A self-contained page: each response with its segments shaded by reward, a bar under
    every token for its entropy (dark above the cutoff, drawn as a line), numbers on hover."""
    scale = reward_scale(views)
    h_max = max([h for v in views for s in v["segments"] for h in s["token_entropy"]], default=1)
    h_max = max(h_max, 1.25 * threshold if math.isfinite(threshold) else 0, 1e-6)
    css = PAGE_CSS
    if math.isfinite(threshold):  # the cutoff line across every entropy bar
        css += ".bar::after{content:'';position:absolute;left:0;right:0;"
        css += f"bottom:{100 * threshold / h_max:.1f}%;border-top:1px solid #d9480f}}"
    sections = [view_html(v, scale, h_max, threshold) for v in views]
    legend = "bars: each token's entropy H under the reference model"
    if math.isfinite(threshold):
        legend += f"; <span style='color:#d9480f'>line</span>: the cutoff c = {threshold:g}"
    if any(s.get("reward") is not None for v in views for s in v["segments"]):
        ends = [f"rgb{segment_rgb({'reward': r}, 0, 1)}" for r in (-1, 1)]
        grad = f"linear-gradient(to right,{ends[0]},#fff,{ends[1]})"
        ticks = "".join(f"<span>{t}</span>" for t in (f"{-scale:+.2f}", "0", f"{scale:+.2f}"))
        scale_key = f"segment reward<div class=grad style='background:{grad}'></div>"
        legend = f"{scale_key}<div class=ticks>{ticks}</div></div><div>{legend}"
    legend = f"<div>{legend}</div>"  # one flex item per key
    columns = f"repeat({min(2, len(views))},minmax(0,1fr))"
    return (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>segments, c = {threshold:g}"
        f"</title><style>{css}</style><h1>Segment-level rewards</h1><div class=sub>entropy "
        f"cutoff c = {threshold:g}</div><div class=keys>{legend}</div><div class=views "
        f"style='grid-template-columns:{columns}'>{''.join(sections)}</div></html>\n"
    )


def view_html(view, scale, h_max, threshold):
    """One response: a <span class=seg> per segment, holding one text-over-bar block a token."""
    spans = []
    for k, seg in enumerate(view["segments"]):
        reward = seg.get("reward")
        hover = f"segment {k + 1}" + ("" if reward is None else f" | reward {reward:+.2f}")
        hover += f" | H at its end {seg['entropy']:.2f}"
        data = f" data-entropy={seg['entropy']}" + (
            "" if reward is None else f" data-reward={reward}"
        )
        tokens = []
        for n, (token, h) in enumerate(zip(seg["tokens"], seg["token_entropy"])):
            high = " class=hi" if h > threshold else ""
            height = f"style='height:{100 * h / h_max:.0f}%'"
            bar = f"<span class=bar title='H = {h:.2f}'><i{high} {height}></i></span>"
            end = " end" if n == len(seg["tokens"]) - 1 else ""
            tokens.append(
                f"<span class='tok{end}'><span class=tt>{html.escape(token)}</span>{bar}</span>"
            )
        rgb = segment_rgb(seg, k, scale)
        spans.append(
            f"<span class=seg{data} title='{html.escape(hover)}' "
            f"style='background:rgb{rgb}'>{''.join(tokens)}</span>"
        )
    rewards = [s["reward"] for s in view["segments"] if s.get("reward") is not None]
    summary = f"{len(view['segments'])} segments" + (
        f", mean reward {sum(rewards) / len(rewards):+.2f}" if rewards else ""
    )
    return (
        f"<section class=view><h2>{html.escape(view['title'])}</h2><div class=sub>{summary}"
        f"</div><div class=resp>{''.join(spans)}</div></section>"
    )


def segments_terminal(segments, color):
    """The response on one line, each segment on its reward's colour (24-bit ANSI) when `color`,
    else plain and separated by ' | '; then a numbered table of the segments."""
    scale = reward_scale([{"segments": segments}])
    parts = []
    for k, seg in enumerate(segments):
        text = seg["text"].replace("\n", "\\n")
        if color:
            text = (
                "\033[48;2;{};{};{}m\033[38;2;27;31;36m".format(*segment_rgb(seg, k, scale))
                + text
                + "\033[0m"
            )
        parts.append(text)
    lines = ["".join(parts) if color else " | ".join(parts)]
    for k, seg in enumerate(segments):
        reward = "" if seg.get("reward") is None else f"  r={seg['reward']:+7.3f}"
        lines.append(f"{k + 1:3d}  H={seg['entropy']:6.3f}{reward}  {seg['text']!r}")
    return "\n".join(lines)


def sample_table(tokenizer, data, i):
    """One rollout cut into its segments, each with its dense reward: what the method sees."""
    response, mask, ends, dense = (
        data["response"][i],
        data["mask"][i],
        data["ends"][i],
        data["dense"][i],
    )
    stops = ends.nonzero().squeeze(1).tolist()
    spans = zip([0] + [s + 1 for s in stops[:-1]], stops)
    parts = [
        f"[{tokenizer.decode(response[a : b + 1])}|{dense[a : b + 1].sum().item():+.2f}]"
        for a, b in spans
    ]
    return "sample: " + " ".join(parts) + f"  ({int(mask.sum())} tokens)"


def plot_normalizer(path, positions, rewards, params):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a_mu, a_sigma, b_mu, b_sigma = params
    groups, index = torch.unique(torch.round(positions * 1000) / 1000, return_inverse=True)
    mean = torch.stack([rewards[index == i].mean() for i in range(len(groups))])  # plotting only
    std = torch.stack([rewards[index == i].std(correction=0) for i in range(len(groups))])
    p = torch.linspace(groups.min().item(), 1, 200)
    plt.figure(figsize=(6, 4))
    plt.scatter(groups, mean, s=8, label="mean per position")
    plt.scatter(groups, std, s=8, label="std per position")
    plt.plot(p, a_mu * p.log() + b_mu, label="mu(p)")
    plt.plot(p, a_sigma * p.log() + b_sigma, label="sigma(p)")
    plt.xlabel("relative position p = k / K")
    plt.legend()
    plt.tight_layout()
    plt.savefig(path)


# ----------------------------------------------------------------------------------------------
# Command line: one subcommand per stage; dataclass fields become flags, resolved and checked once
# before anything runs.

RANGES = {  # flag: (test, what it must be)
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "lr": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "critic_lr": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "entropy_threshold": (lambda v: v >= 0, ">= 0 (0: token level, inf: bandit)"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "grad_accum": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "max_len": (lambda v: v >= 2, ">= 2"),
    "max_prompt_len": (lambda v: v >= 1, ">= 1"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "save_every": (lambda v: v >= 0, ">= 0"),
    "lora_rank": (lambda v: v >= 0, ">= 0"),
    "eval_size": (lambda v: v >= 1, ">= 1"),
    "norm_samples": (lambda v: v >= 0, ">= 0"),
    "flaw_rate": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "steps": (lambda v: v >= 1, ">= 1"),
    "episodes": (lambda v: v >= 0, ">= 0"),
    "mini_batch_size": (lambda v: v >= 1, ">= 1"),
    "ppo_epochs": (lambda v: v >= 1, ">= 1"),
    "beta": (lambda v: v >= 0, ">= 0"),
    "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "lam": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "clip_eps": (lambda v: v > 0, "> 0"),
    "temperature": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "eval_prompts": (lambda v: v >= 1, ">= 1"),
    "rollout_chunk": (lambda v: v >= 1, ">= 1"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "end_penalty_len": (lambda v: v >= 1, ">= 1"),
}
COMMANDS = {"sft": "toy-sft", "train-rm": "toy-rm", "fit-norm": "", "ppo": "toy-ppo", "segment": ""}


def check_ranges(args):
    """Out-of-range flags fail with one line before any model or file is touched (NaN fails)."""
    for name, (ok, what) in RANGES.items():
        if hasattr(args, name) and not ok(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.max_prompt_len >= args.max_len:
        fail(f"--max-prompt-len ({args.max_prompt_len}) must be below --max-len ({args.max_len})")
    if isinstance(args, PPOArgs) and args.max_prompt_len + args.max_new_tokens > args.max_len:
        fail(
            f"--max-prompt-len + --max-new-tokens ({args.max_prompt_len} + "
            f"{args.max_new_tokens}) must not exceed --max-len ({args.max_len})"
        )


def resolve(command, args):
    """Every derived setting, once, right after parsing, with its checks: output directory, rows
    per process per forward, and for ppo the reward model, reward mode and value clip."""
    if isinstance(args, SegmentArgs):
        return args
    check_ranges(args)
    if args.resume and args.overwrite:
        fail("--resume continues a run and --overwrite starts it again: pass one of them")
    if command == "fit-norm":  # in place unless --output-dir; the entropy cache goes there
        args.output_dir = args.output_dir or args.reward_model
    args.output_dir = args.output_dir or f"runs/{COMMANDS[command]}"
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if args.batch_size % (args.grad_accum * processes):
        fail(
            f"--batch-size {args.batch_size} must be a multiple of --grad-accum x processes "
            f"({args.grad_accum} x {processes})"
        )
    args.micro_batch = args.batch_size // (args.grad_accum * processes)
    if command == "ppo":
        if (
            args.mini_batch_size % (args.grad_accum * processes)
            or args.batch_size % args.mini_batch_size
        ):
            fail(
                f"--mini-batch-size {args.mini_batch_size} must divide --batch-size and split "
                "over --grad-accum x processes"
            )
        args.micro_batch = args.mini_batch_size // (args.grad_accum * processes)
        if not args.reward_model and args.model:
            fail("--reward-model is required with --model")
        args.reward_model = args.reward_model or TOY_RM
        resolve_reward(args, planned_rm_settings(args))
    return args


def add_dataclass_args(parser, cls):
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name, help = "--" + f.name.replace("_", "-"), f.metadata.get("help")
        if f.type is bool:
            parser.add_argument(
                name, action=argparse.BooleanOptionalAction, default=f.default, help=help
            )
        else:
            parser.add_argument(
                name, type=f.type, default=f.default, help=help, choices=f.metadata.get("choices")
            )


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage block; --help has the rest
        fail(f"{message} (see {self.prog} --help)")


ARGS = {
    "sft": SFTArgs,
    "train-rm": RMArgs,
    "fit-norm": FitNormArgs,
    "ppo": PPOArgs,
    "segment": SegmentArgs,
}


def parse_args(argv=None):
    parser = ArgumentParser(prog="segment_rlhf.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    subparsers = {name: sub.add_parser(name) for name in ARGS}
    for name, cls in ARGS.items():
        add_dataclass_args(subparsers[name], cls)
    ns = parser.parse_args(argv)
    if getattr(ns, "preset", ""):  # a preset changes the defaults; explicit flags still win
        subparsers[ns.command].set_defaults(**preset_defaults(ns.preset, ns.command))
        ns = parser.parse_args(argv)
    cls = ARGS[ns.command]
    return ns.command, cls(
        **{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init}
    )


def main(argv=None):
    command, args = parse_args(argv)
    args = resolve(command, args)
    if getattr(args, "dry_run", False):
        resolved = {"command": command, **dataclasses.asdict(args)}
        if command == "ppo":
            resolved["reward_model_settings"] = planned_rm_settings(args)
            if args.episodes > 0:
                resolved["steps"] = (
                    f"--episodes {args.episodes} x prompts / --batch-size, counted at load"
                )
        print(json.dumps(resolved, indent=1))
        return resolved
    run = {"sft": sft, "train-rm": train_rm, "fit-norm": fit_norm, "ppo": ppo, "segment": segment}
    try:
        result = run[command](args)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130 as for any SIGINT
        hint = "; resume with --resume" if command in ("train-rm", "ppo") else ""
        print(f"segment_rlhf: error: interrupted{hint}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        close_run(args)  # a run that did not finish leaves no directory it created
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
