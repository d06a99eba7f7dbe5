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

    python segment_rlhf.py ppo                     # toy task on a CPU; builds sft and the RM first
    python segment_rlhf.py segment --reward-model runs/toy-rm
    python segment_rlhf.py train-rm --preset phi3-mini --dry-run      # the paper's settings
    python segment_rlhf.py train-rm --preset phi3-mini --lora-rank 64
    accelerate launch --multi_gpu --num_processes 8 segment_rlhf.py ppo --preset phi3-mini
    python segment_rlhf.py segment --model SmolLM2-135M-Instruct.Q4_1.gguf --entropy-threshold 3

    from segment_rlhf import segment_rewards    # a saved reward model's segments and rewards
    answer = ("Name 6 fruits.", "Fruits: apple, fig, kiwi, lemon, mango, plum.")
    segment_rewards("runs/toy-rm", [answer])

Reading order: configuration and the paper's settings, the method (sections 1-5: small pure
functions), the training loops, the segment view, the toy task; then plumbing: data, models, runs,
reward-model settings, CLI.
"""

import bisect
import contextlib
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import struct
import sys
import time
import types
from dataclasses import dataclass, field

import datasets
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from filelock import FileLock, Timeout
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import StrictDataclassError
from jinja2 import TemplateError
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    GenerationConfig,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_scheduler,
)
from transformers.utils import logging as transformers_logging
from trl.data_utils import maybe_extract_prompt

# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass per subcommand, each field a flag (transformers' HfArgumentParser);
# the defaults are the toy run, unset means None. Then the paper's settings, which --preset sets.


def arg(default, help, **extra):
    """A dataclass field that is also a command-line flag with this help text."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Common:
    model: str = arg("", "SFT / reference model: hub id, directory or .gguf (unset: toy SFT)")
    dataset: str = arg("", "hub id or a .json/.jsonl/.parquet file (unset: the toy task)")
    output_dir: str = arg("", "where the run is written (unset: runs/toy-<subcommand>)")
    seed: int = arg(0, "random seed")
    max_len: int = arg(64, "max tokens of prompt + response")
    max_prompt_len: int = arg(32, "prompts longer than this are cut from the left")
    end_token: str = arg("", "token closing a response (unset: the tokenizer's eos)")
    lr: float = arg(1e-3, "learning rate")
    batch_size: int = arg(32, "global batch size (pairs for train-rm, prompts for ppo)")
    grad_accum: int = arg(1, "gradient accumulation steps per optimizer step")
    warmup_ratio: float = arg(0.03, "linear warm-up, as a fraction of all steps")
    bf16: bool = arg(False, "bf16 mixed precision")
    overwrite: bool = arg(False, "replace a finished run in --output-dir once the new one is done")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward: less memory")
    lora_rank: int = arg(0, "LoRA rank (peft) of the trained models; 0: full fine-tuning")
    lora_alpha: float = arg(16.0, "LoRA scaling numerator")
    lora_targets: str = arg("all-linear", "modules that get adapters (peft target_modules)")
    preset: str = arg("", "look | phi3-mini | llama3-sft-8b | llama31-instruct-8b | smollm2-135m")
    dry_run: bool = arg(False, "print the resolved configuration and exit")
    save_every: int = arg(0, "train-rm, ppo: checkpoint every N optimizer steps / iterations")
    resume: bool = arg(False, "train-rm, ppo: continue from the newest checkpoint")
    min_lr_ratio: float = arg(0.0, "cosine decay to this fraction of --lr (the authors: 0.1)")
    long_pairs: str = arg("skip", "pairs over --max-len", choices=("skip", "truncate"))
    head_init: str = arg("model", "fresh scalar heads", choices=("model", "authors"))
    toy_lists: int = arg(1, "toy only: lists per answer, ~17 tokens each (docs/toy.md: length)")
    micro_batch: int = field(default=0, init=False)  # derived: rows per process per forward


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
    norm_samples: int = arg(0, "training pairs scored; 0: all (the authors: 60,000 pairs)")
    eval_size: int = arg(200, "held-out pairs for the bandit mean / std (as train-rm splits them)")
    plot: str = arg("", "also draw means / stds per position and the fitted curves to this PNG")


@dataclass
class PPOArgs(Common):
    reward_model: str = arg("", "reward model: directory or hub id (unset: the toy one)")
    reward_mode: str = arg("", "unset: the RM's", choices=("segment", "token", "bandit"))
    interpolation: str = arg("even", "within-segment split", choices=("even", "last", "repeat"))
    location_norm: bool = arg(True, "location-aware normalization (--no-location-norm: raw)")
    steps: int = arg(120, "PPO iterations (rollout batch + update)")
    episodes: float = arg(0.0, "if > 0: --steps = this many passes over the prompts")
    batch_size: int = arg(64, "rollout batch: prompts per iteration (global)")
    mini_batch_size: int = arg(16, "train batch: rollouts per optimizer step (global)")
    ppo_epochs: int = arg(2, "passes over each rollout batch")
    lr: float = arg(1e-4, "actor learning rate (toy; the presets set their own)")
    critic_lr: float = arg(1e-4, "critic learning rate")
    beta: float = arg(0.3, "KL coefficient, fixed (paper 0.01; toy 0.3: docs/toy.md)")
    gamma: float = arg(1.0, "discount")
    lam: float = arg(0.95, "GAE lambda")
    clip_eps: float = arg(0.2, "policy ratio clip")
    value_clip: float | None = arg(None, "value clip (unset: 0.25 dense, 0.2 bandit)")
    temperature: float = arg(1.0, "sampling temperature")
    top_p: float = arg(1.0, "nucleus sampling")
    max_new_tokens: int = arg(24, "generation length limit")
    missing_eos_penalty: float = arg(1.0, "subtracted at the end of unended responses (paper 0)")
    end_penalty: float | None = arg(
        None, "reward at every token of responses unended or over --end-penalty-len (preset's)"
    )
    end_penalty_len: int = arg(800, "response length over which --end-penalty applies")
    length_norm: bool | None = arg(
        None, "divide each token reward by the response length (preset's)", nargs="?", const=True
    )
    segment_mean: bool = arg(False, "divide each token reward by the answer's segment count")
    eval_prompts: int = arg(128, "held-out prompts scored before and after training")
    rollout_chunk: int = arg(64, "prompts generated and scored at once per process (memory)")


@dataclass
class SegmentArgs:
    prompt: str | None = arg(None, "user prompt (chat template applied)")
    response: str | None = arg(None, "response to segment")
    text: str | None = arg(None, "raw text to segment, no chat template")
    dataset: str | None = arg(None, "take the pair from this dataset's row --row")
    row: int = arg(0, "dataset row")
    model: str = arg("", "reference model giving the entropies (unset: the reward model's)")
    reward_model: str = arg("", "reward model directory: adds segment rewards")
    entropy_threshold: float | None = arg(None, "cutoff c (unset: the reward model's, else 1)")
    html: str = arg("", "also write the segments as an HTML page to this file")
    end_token: str = arg("", "token closing a response (unset: the tokenizer's eos)")


# The values each number may take, in interval notation: a value outside (NaN included) would run
# and give a wrong result, so it is refused with one line before anything starts.
BOUNDS = {
    "[0, 4294967296)": "seed",
    "(0, 1]": "lr critic_lr gamma top_p",
    "[0, 1]": "lam flaw_rate min_lr_ratio",
    "[0, 1)": "warmup_ratio",
    "[0, inf]": "entropy_threshold",
    "[0, inf)": "save_every lora_rank norm_samples beta row",
    "[0, 1e6]": "episodes",  # int(episodes x prompts / batch size): infinity is no step count
    "(0, inf)": "clip_eps value_clip lora_alpha",
    "[0.1, inf)": "temperature",  # below, softmax(z / T) saturates: zero gradients, no learning
    "[-1e4, 1e4]": "missing_eos_penalty end_penalty",  # rewards are O(1); 1e39 overflows fp32
    "[2, inf)": "max_len",
    "[1, 8]": "toy_lists",
    "[1, inf)": "batch_size grad_accum epochs max_prompt_len eval_size steps mini_batch_size "
    "ppo_epochs max_new_tokens eval_prompts rollout_chunk end_penalty_len",
}

# The paper's runs: model, cutoff c, end token, episodes, released reward models, the authors'
# fitted normalizers (a_mu, a_sigma, b_mu, b_sigma) at c and at c = 0, the bandit's (mean, std),
# and the reward tweaks of their runs by reward mode (see token_rewards).
# fmt: off
PAPER_MODELS = {
    "phi3-mini": dict(
        model="microsoft/Phi-3-mini-4k-instruct", c=1.75, end_token="<|end|>", episodes=2,
        rm="yyqoni/Phi-3-mini-4k-instruct-{}-rm-700k", recipe={},
        segment=(0.7668, 0.2569, 0.4705, 2.8339), token=(0.9628, 0.3796, 1.2917, 3.5006),
        bandit=(-0.5195, 2.1563)),
    "llama3-sft-8b": dict(
        model="RLHFlow/LLaMA3-SFT-v2", c=2.0, end_token="<|eot_id|>", episodes=1,
        rm="yyqoni/rlhflow-llama-3-sft-8b-v2-{}-rm-700k", recipe={"token": {"length_norm": True}},
        segment=(0.8967, 0.5680, 0.8572, 4.1667), token=(1.7340, 0.9906, 1.3212, 5.4513),
        bandit=(-0.8164, 2.9531)),
    "llama31-instruct-8b": dict(
        model="meta-llama/Llama-3.1-8B-Instruct", c=2.0, end_token="<|eot_id|>", episodes=1,
        rm="yyqoni/meta-llama-3.1-instruct-8b-{}-rm-700k",
        recipe={"segment": {"end_penalty": -0.05}},
        segment=(0.8345, 0.4780, 0.8798, 3.7358), token=(1.6268, 0.6254, 0.6419, 4.9217),
        bandit=(-0.8281, 2.9375)),
    # Not from the paper: sized for one small GPU, no released reward model (train-rm --preset
    # writes it). c = 3.0: phrase-length segments (docs/smollm2.md); learning rates not tuned.
    "smollm2-135m": dict(
        model="HuggingFaceTB/SmolLM2-135M-Instruct", c=3.0, end_token="<|im_end|>", episodes=1,
        rm=None, recipe={}, rm_sizes=dict(lr=1e-5, batch_size=64, max_len=1024, max_prompt_len=768),
        ppo_sizes=dict(lr=1e-6, critic_lr=1e-5, batch_size=256, mini_batch_size=32, grad_accum=4,
                       max_prompt_len=512, max_new_tokens=512, max_len=1024)),
}
PAPER_RM = dict(dataset="hendrydong/preference_700K", lr=1e-6, epochs=1, batch_size=128,
                grad_accum=16, max_len=2048, max_prompt_len=1728, eval_size=1000,
                norm_samples=60000, long_pairs="truncate")
PAPER_PPO = dict(dataset="argilla/ultrafeedback-binarized-preferences-cleaned", lr=5e-7,
                 critic_lr=9e-6, batch_size=1024, mini_batch_size=128, grad_accum=16, ppo_epochs=1,
                 max_prompt_len=1024, max_new_tokens=1024, max_len=2048, beta=0.01,
                 missing_eos_penalty=0.0)
# fmt: on
PAPER_BOTH = dict(bf16=True, gradient_checkpointing=True, min_lr_ratio=0.1, head_init="authors")

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


def position_groups(positions, rewards):
    """Per distinct position p (rounded to 3 decimals): p, segment count, mean and std of r."""
    groups, index = torch.unique(torch.round(positions.double() * 1000) / 1000, return_inverse=True)
    count = torch.bincount(index, minlength=len(groups)).double()
    mean = torch.zeros_like(groups).index_add_(0, index, rewards.double()) / count
    sq_dev = (rewards.double() - mean[index]) ** 2
    std = (torch.zeros_like(groups).index_add_(0, index, sq_dev) / count).sqrt()
    return groups, count, mean, std


def fit_location_normalizer(positions, rewards):
    """(a_mu, a_sigma, b_mu, b_sigma) from 1-D tensors of segment positions p and rewards r."""
    groups, count, mean, std = position_groups(positions, rewards)
    keep = count >= 2  # a single sample has no std
    x = groups[keep].log()
    (a_mu, b_mu), (a_sigma, b_sigma) = huber_fit(x, mean[keep]), huber_fit(x, std[keep])
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


def token_rewards(rm_values, entropy, logprobs, ref_logprobs, sample, args, settings):
    """The whole reward PPO optimizes, (B, R) per response token, assembled in the paper's order:
    segment ends (1) -> segment rewards (2) -> location normalization (3) -> interpolation (4)
    -> (the mean over segments) -> the end-of-response terms of the authors' runs -> clamp, minus
    the KL term (5).

    sample: the response `mask` up to and including its stop token, that `stop` token, and
    whether each row `stopped` at all. Returns R, the reward before the KL term, the KL, the
    segment ends and the raw (B,) score (mean segment reward)."""
    mask, stop, stopped = sample["mask"], sample["stop"], sample["stopped"]
    norm = settings if args.location_norm else None
    if args.reward_mode == "bandit":  # one segment, read at the end token (the last when cut)
        ends = segment_ends(entropy, mask, math.inf)
        seg = rm_values if norm is None else (rm_values - norm["mean"]) / norm["std"]
        dense = torch.where(ends, seg, 0.0)
    else:
        content = mask & ~stop  # the stop token is not content
        c = 0.0 if args.reward_mode == "token" else settings["entropy_threshold"]
        ends = segment_ends(entropy, content, c)
        seg = rm_values
        if norm is not None:
            min_p = norm.get("min_position", 0.0)
            seg = normalize_segment_rewards(rm_values, ends, norm["normalizer"], min_p)
        dense = interpolate_rewards(seg, ends, content, args.interpolation)
    # Not the paper's: the reward model ranks answers by their *mean* segment reward, PPO sums
    # them, and a sum grows with every segment added (the toy's longer answers grow extra lists:
    # docs/toy.md). Divided by K, an answer's K evenly split rewards sum to their mean; the
    # bandit's one segment is left as it is.
    if args.segment_mean:
        dense = dense / ends.sum(-1, keepdim=True).clamp(min=1)
    # A response cut off by the length limit loses missing_eos_penalty at its last token.
    last = mask & (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True))
    dense = dense - args.missing_eos_penalty * (last & ~stopped[:, None])
    if args.end_penalty is not None:  # the authors' Llama-3.1-Instruct segment run
        penalized = ~stopped | (mask.sum(-1) > args.end_penalty_len)
        dense = torch.where(penalized[:, None], args.end_penalty * mask.float(), dense)
    if args.length_norm:  # the authors' Llama-3-SFT token run: rewards sum to their mean
        dense = dense / mask.sum(-1, keepdim=True).clamp(min=1)
    kl = (logprobs - ref_logprobs) * mask
    rewards = dense.clamp(-10, 10) - args.beta * kl
    return rewards, dense, kl, ends, segment_scores(rm_values, ends)


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


def whiten(x, mask, all_sum=lambda t: t):
    """(x - mean) / std over the masked entries of the rollout batch. `all_sum` sums a tensor
    over the data-parallel processes, so each process whitens its share with the statistics of
    the whole batch, as one process holding all of it would."""
    n = all_sum(mask.sum()).clamp(min=1)
    mean = all_sum((x * mask).sum()) / n
    var = all_sum(((x - mean) ** 2 * mask).sum()) / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def logprobs_of(logits, tokens, temperature):
    """Log-probabilities of `tokens` under softmax(logits / temperature), as they were sampled."""
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
    model_path = model_folder(toy_model(args.model or TOY_SFT))
    tokenizer = load_tokenizer(model_path)
    ds = rm_pairs(args, tokenizer)
    if done := start_run(args, "train-rm", accelerator, [model_path, args.dataset]):
        return done
    model, optimizer, train_loader, eval_loader, scheduler, split = rm_setup(
        args, accelerator, model_path, tokenizer, ds
    )
    # Where training stands: optimizer steps, epoch, batches done in it, the epoch's loss so far.
    fresh = {"step": 0, "epoch": 0, "batch": 0, "loss_sum": 0.0}
    state = (load_checkpoint(accelerator, args, fresh) if args.resume else None) or fresh
    step, per_epoch = state["step"], len(train_loader)
    done_before = state["epoch"] * per_epoch + state["batch"]
    quiet = not accelerator.is_local_main_process
    bar = tqdm(total=args.epochs * per_epoch, initial=done_before, desc="train-rm", disable=quiet)
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
                    check_finite(accelerator, loss_sum, "loss", step + 1)
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
            bar.write(json.dumps(plain(metrics)))
    bar.close()  # now: an error line later must not be followed by the bar
    # The location-aware normalizer, fitted on the trained model; then the model and its settings.
    c, end = args.entropy_threshold, args.end_token or tokenizer.eos_token
    fitted = fit_normalizer(args, accelerator, model, tokenizer.pad_token_id, c, split)[0]
    save_model(accelerator, model, tokenizer, args.output_dir)
    settings = dict(entropy_threshold=c, reference_model=model_path, end_token=end, **fitted)
    settings.update(reference_stamp=stamp(model_path))  # the reference it was trained on, as it was
    settings.update({} if args.dataset else {"toy_lists": args.toy_lists})  # what it answers
    if accelerator.is_main_process:
        write_rm_settings(args.output_dir, settings)
    names = {"eval_accuracy": "rm/accuracy", "rm/loss": "rm/loss"}
    result = {key: round(metrics[name], 4) for key, name in names.items()}
    result["segment/per_response"] = round(metrics["segment/per_response"], 2)
    result.update(toy_rm_report(args, accelerator, model_path, tokenizer))  # the toy only
    result.update(output_dir=RUN["given"], entropy_threshold=args.entropy_threshold)
    return finish_run(args, accelerator, result)


def rm_setup(args, accelerator, model_path, tokenizer, ds):
    """Reference entropies (cached), train / eval split, loaders, the value model and optimizer."""
    bandit = math.isinf(args.entropy_threshold)
    ds = ds if bandit else add_entropies(ds, args, accelerator, model_path, tokenizer)
    split = ds.train_test_split(test_size=args.eval_size, seed=args.seed)
    collate = pair_collate(tokenizer.pad_token_id, bandit)
    batch = args.batch_size // args.grad_accum
    # The loader gets its own generator, not the global RNG (see ppo_data).
    shuffled = dict(shuffle=True, generator=torch.Generator())
    train_loader = DataLoader(split["train"], batch, collate_fn=collate, **shuffled)
    eval_loader = DataLoader(split["test"], batch, collate_fn=collate)
    set_seed(args.seed)  # the head's random init must not depend on what ran before in the process
    model = load_model(model_path, "value", args.bf16 and args.lora_rank > 0, tokenizer)
    model = trainable(init_head(model, args.head_init), args, "value")
    steps = args.epochs * math.ceil(len(train_loader) / args.grad_accum)
    optimizer, scheduler = make_optimizer(model, args, steps)
    return *accelerator.prepare(model, optimizer, train_loader, eval_loader, scheduler), split


@torch.no_grad()
def reference_entropy(ref_model, input_ids, attention_mask, batch_size=64):
    """(N, T) entropies of the frozen reference model, one no-grad forward per example."""
    chunks = zip(input_ids.split(batch_size), attention_mask.split(batch_size))
    entropies = [token_entropy(forward(ref_model, i, m).logits) for i, m in chunks]
    entropy = torch.cat(entropies) * attention_mask
    if not torch.isfinite(entropy).all():  # NaN > c is False: no segment cut, and no word said
        fail(f"the reference model {ref_model.name_or_path} gives non-finite entropies: damaged?")
    return entropy


def add_entropies_batch(rows, ref_model, pad_id, device):
    """datasets.map body: the reference entropy at every response token of chosen and rejected."""
    out = {}
    for key in ("chosen", "rejected"):
        seqs = [p + r for p, r in zip(rows["prompt_ids"], rows[f"{key}_ids"])]
        ids, mask = pad_right(seqs, pad_id).to(device), pad_right([[1] * len(s) for s in seqs], 0)
        ent = reference_entropy(ref_model, ids, mask.to(device))
        spans = zip(ent.cpu(), rows["prompt_ids"], seqs)
        out[f"{key}_entropy"] = [e[len(p) : len(s)].tolist() for e, p, s in spans]
    return out


def add_entropies(ds, args, accelerator, model_path, tokenizer):
    """Reference entropies for every pair, cached on disk and keyed on what they depend on (the
    encoded data, the reference weights): one forward per example for the whole run, each process
    computing its contiguous share. Every part, and the entry that gathers them, is a folder
    written through atomic(): the half file datasets leaves on a full disk goes with it."""
    # (the data's fingerprint follows the file's name, size and time, not its content: hence the
    # data's own stamp)
    key = json.dumps([ds._fingerprint, stamp(model_path), stamp(args.dataset)])
    name = f"entropy-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    inputs = [model_path, args.dataset, getattr(args, "reward_model", "")]
    cache = os.path.join(cache_dir("entropy", inputs), name)
    rank, world = accelerator.process_index, accelerator.num_processes
    part = lambda i: f"{cache}.part-{i}-of-{world}"  # noqa: E731
    # The locks hold off another run that computes the same entropies at the same time.
    with FileLock(part(rank) + ".lock"):  # the part first: the merge removes it after
        if not os.path.exists(part(rank)) and not os.path.exists(cache):  # a hit loads no model
            pad, device = tokenizer.pad_token_id, accelerator.device
            ref = load_model(model_path, "causal", args.bf16, tokenizer).eval().to(device)
            body = functools.partial(add_entropies_batch, ref_model=ref, pad_id=pad, device=device)
            with atomic(part(rank)) as tmp:
                os.makedirs(tmp)
                if rank < len(ds):  # more processes than rows: an empty share has no part
                    share = ds.shard(world, rank, contiguous=True)
                    batches = dict(batched=True, batch_size=64, desc="entropies")
                    share.map(body, cache_file_name=os.path.join(tmp, "entropy.arrow"), **batches)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with FileLock(cache + ".lock"):
            if not os.path.exists(cache):  # the parts, in order, become the entry
                with atomic(cache) as tmp:
                    os.makedirs(tmp)
                    for i in range(min(world, len(ds))):
                        into = os.path.join(tmp, f"entropy-{i:05d}.arrow")
                        os.link(os.path.join(part(i), "entropy.arrow"), into)  # no copy
            for i in range(world):
                shutil.rmtree(part(i), ignore_errors=True)
    accelerator.wait_for_everyone()
    files = sorted(f for f in os.listdir(cache) if f.startswith("entropy-"))  # not datasets' own
    try:
        parts = [datasets.Dataset.from_file(os.path.join(cache, f)) for f in files]
    except (OSError, ValueError) as e:  # a disk fault, a cache copied in part
        fail(f"the entropy cache {cache} is damaged ({first_line(e)}); remove it")
    return datasets.concatenate_datasets(parts)


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
            "content_mask": (pos >= start) & (pos < stop),
            "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
        }
        batch["entropy"] = torch.zeros(batch["input_ids"].shape)  # bandit: not needed
        if "chosen_entropy" in rows[0]:
            ents = [r["chosen_entropy"] for r in rows] + [r["rejected_entropy"] for r in rows]
            batch["entropy"] = pad_right([[0.0] * len(p) + e for p, e in zip(prompts, ents)], 0.0)
        return batch

    return collate


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
def collect_segment_rewards(model, loader, threshold, accelerator):
    """Score every pair in `loader`, over all processes: 1-D segment positions and rewards, (N, 2)
    chosen and rejected scores, and the number of content tokens."""
    model.eval()
    positions, rewards, scores, tokens = [], [], [], torch.zeros((), device=accelerator.device)
    for batch in loader:  # plain gather: gather_for_metrics would cut a 2B-row pair batch to B
        values, ends, score = rm_forward(model, batch, threshold)
        pad = accelerator.pad_across_processes
        pos = accelerator.gather(pad(segment_positions(ends), dim=1))
        val = accelerator.gather(pad(values * ends, dim=1))
        positions.append(pos[pos > 0].cpu())
        rewards.append(val[pos > 0].cpu())
        scores.append(accelerator.gather(torch.stack(score.chunk(2), 1)).cpu())
        tokens += batch["content_mask"].sum()
    model.train()
    tokens = accelerator.reduce(tokens, "sum").item()
    return torch.cat(positions), torch.cat(rewards), torch.cat(scores), tokens


def evaluate_rm(model, loader, threshold, accelerator):
    """Held-out accuracy, mean chosen / rejected score, segments per response and their length."""
    positions, _, scores, tokens = collect_segment_rewards(model, loader, threshold, accelerator)
    chosen, rejected = scores.unbind(1)
    return {
        "rm/accuracy": (chosen > rejected).float().mean().item(),
        "rm/chosen_score": chosen.mean().item(),
        "rm/rejected_score": rejected.mean().item(),
        "segment/per_response": len(positions) / (2 * len(chosen)),
        "segment/mean_length": tokens / max(len(positions), 1),
    }


def fit_normalizer(args, accelerator, model, pad_id, threshold, split):
    """The location-aware normalizer from (the first --norm-samples of) the training pairs, the
    bandit's mean and std from the held-out ones, as the authors fit them; and the positions and
    rewards it was fitted on. train-rm and fit-norm both fit this way, on the same split."""
    n = min(args.norm_samples or len(split["train"]), len(split["train"]))
    collate = pair_collate(pad_id, math.isinf(threshold))
    batch = args.batch_size // args.grad_accum

    def collect(ds):
        loader = accelerator.prepare(DataLoader(ds, batch, collate_fn=collate))
        return collect_segment_rewards(model, loader, threshold, accelerator)

    positions, rewards, *_ = collect(split["train"].select(range(n)))
    scores = collect(split["test"])[2]
    if 2 * n < 1000:
        say(f"warning: the normalizer rests on only {2 * n} responses")
    fitted = {"normalizer": list(fit_location_normalizer(positions, rewards))}
    fitted.update(min_position=positions.min().item(), norm_samples=2 * n)
    fitted.update(mean=scores.mean().item(), std=scores.std().item())  # the bandit's
    return fitted, positions, rewards


def fit_norm(args):
    """Fit (or refit) the normalizer of an existing reward model. The settings are written only
    once everything succeeded: in place (the previous config.json kept as config.json.bak) or,
    with --output-dir, into a copy of the reward model."""
    accelerator = make_accelerator(args)
    settings = load_rm_settings(args.reward_model)
    check_fits(args, settings)
    if not args.dataset and "toy_lists" not in settings:  # the toy pairs fit the toy's RM only
        why = "was not trained on the toy: pass the --dataset it was trained on"
        fail(f"{args.reward_model} {why}")
    threshold = settings["entropy_threshold"]
    ref_path = reference_model(args, settings)
    # the reference model only loads if its entropies are not cached (add_entropies)
    tokenizer, _, model = load_scorers(ref_path, args.reward_model, args.bf16, with_ref=False)
    inputs = [ref_path, args.dataset, args.reward_model]
    plot = args.plot and output_path(args.plot, inputs, "--plot")
    if plot and not plot.lower().endswith(".png"):  # so never args.json or another run file
        fail(f"--plot {args.plot}: the plot is a PNG image; give it a name ending in .png")
    if plot:  # checked before the work, not after it
        import matplotlib  # noqa: F401
    args.end_token = args.end_token or settings["end_token"]
    ds = rm_pairs(args, tokenizer)
    split = ds.train_test_split(test_size=args.eval_size, seed=args.seed)
    n = min(args.norm_samples or len(split["train"]), len(split["train"]))
    pairs = f"{n} training pairs, the mean / std from {args.eval_size} held-out pairs"
    say(f"fit-norm: the normalizer from {pairs} (train-rm's split: same --eval-size and --seed)")
    in_place = os.path.realpath(args.output_dir) == os.path.realpath(args.reward_model)
    if done := start_run(args, "fit-norm", accelerator, inputs[: 2 if in_place else 3], in_place):
        return done
    if not math.isinf(threshold):  # entropies of just the pairs fitted on, in one pass
        ds = datasets.concatenate_datasets([split["train"].select(range(n)), split["test"]])
        ds = add_entropies(ds, args, accelerator, ref_path, tokenizer)
        split = {"train": ds.select(range(n)), "test": ds.select(range(n, len(ds)))}
    model, pad = model.to(accelerator.device), tokenizer.pad_token_id
    fitted, positions, rewards = fit_normalizer(args, accelerator, model, pad, threshold, split)
    if not all(math.isfinite(v) for v in [*fitted["normalizer"], fitted["mean"], fitted["std"]]):
        fail(f"the fit on {2 * n} responses is not finite; pass a larger --norm-samples")
    settings.update(fitted, reference_model=ref_path, reference_stamp=stamp(ref_path))
    if accelerator.is_main_process:
        if plot:  # first: a failing plot leaves the settings as they were
            from benchmarks.extras import plot_normalizer

            # inside the run this one replaces: into the staged run, not the one removed
            if os.path.commonpath([plot, RUN["final"]]) == RUN["final"]:
                plot = os.path.join(args.output_dir, os.path.relpath(plot, RUN["final"]))
                os.makedirs(os.path.dirname(plot), exist_ok=True)
            with atomic(plot) as tmp:  # a new file: a hard link to its path keeps its own
                plot_normalizer(tmp, positions, rewards, settings["normalizer"])
        for name in [] if in_place else os.listdir(args.reward_model):  # not its run records
            path = os.path.join(args.reward_model, name)
            if os.path.isfile(path) and name.split(".")[0] not in ("args", "metrics", "result"):
                shutil.copy2(path, os.path.join(args.output_dir, name))
        write_rm_settings(args.output_dir, settings, backup=in_place)
    result = {k: settings[k] for k in ("normalizer", "mean", "std", "norm_samples")}
    return finish_run(args, accelerator, {**result, "output_dir": RUN["given"]})


# ----------------------------------------------------------------------------------------------
# PPO against dense segment rewards (sections 4-5). Each iteration: sample a rollout batch and
# score it (one reference forward gives both the KL log-probs and the segmenting entropies), GAE,
# whitened advantages, epochs of clipped mini-batch updates, one metrics row.


def ppo(args):
    from benchmarks import extras  # the rollout shown now and then, cut into its segments

    accelerator, tokenizer, settings, loader, eval_loader = ppo_data(args)
    models = ppo_models(args, accelerator, settings, tokenizer)
    if done := start_run(args, "ppo", accelerator, [models.path, args.reward_model, args.dataset]):
        return done
    # AdamW and schedules, each prepared with its model: FSDP wraps models one call at a time.
    opt_p, sched_p = make_optimizer(models.policy, args, args.steps)
    critic_args = dataclasses.replace(args, lr=args.critic_lr)
    opt_c, sched_c = make_optimizer(models.critic, critic_args, args.steps)
    models.policy, opt_p = accelerator.prepare(models.policy, opt_p)
    models.critic, opt_c = accelerator.prepare(models.critic, opt_c)
    accelerator.register_for_checkpointing(sched_p, sched_c)
    policy, critic = models.policy, models.critic
    resumed = load_checkpoint(accelerator, args, {"step": 0, "before": {}}) if args.resume else None
    state = resumed or {"step": 0, "before": evaluate_policy(models, eval_loader, args, settings)}
    before, metrics = state["before"], state.get("metrics", {})
    quiet = not accelerator.is_local_main_process
    batches = prompt_batches(accelerator, loader, state["step"], args.steps)
    bar = tqdm(batches, total=args.steps - state["step"], desc="ppo", disable=quiet)
    for step, batch in bar:
        start = time.perf_counter()
        # 1. Rollout: sample, then score: old log-probs, values, rewards, KL, advantages.
        policy.eval()
        critic.eval()
        chunk = args.rollout_chunk  # prompts generated and scored at once
        prompts = zip(batch["input_ids"].split(chunk), batch["attention_mask"].split(chunk))
        chunks = [rollout(models, ids, mask, args, settings) for ids, mask in prompts]
        data = {k: cat_padded([chunk[k] for chunk in chunks]) for k in chunks[0]}
        check_finite(accelerator, data["dense"], "reward", step + 1)
        all_sum = lambda t: accelerator.reduce(t, "sum")  # noqa: E731
        data["advantages"] = whiten(data["advantages"], data["mask"], all_sum)
        # 2. Epochs of clipped mini-batch updates over the rollout batch.
        policy.train()
        critic.train()
        stats, n, device = [], len(data["seq"]), data["seq"].device
        for _ in range(args.ppo_epochs):
            for idx in torch.randperm(n, device=device).split(args.micro_batch):
                mini = {k: v[idx] for k, v in data.items()}
                stats.append(ppo_update(models, mini, (opt_p, opt_c), args, step + 1))
        sched_p.step()
        sched_c.step()
        # 3. Log: rollout statistics, losses and diagnostics, a sample now and then.
        metrics = ppo_metrics(accelerator, tokenizer, data, stats, batch["prompt_text"], args)
        row = {"step": step + 1, **metrics, "time/step_s": time.perf_counter() - start}
        log_metrics(args, accelerator, row)
        bar.set_postfix(reward=f"{metrics['ppo/reward']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
        if accelerator.is_main_process and (step + 1) % max(1, args.steps // 4) == 0:
            bar.write(extras.sample_table(tokenizer, data, 0))
        if args.save_every and (step + 1) % args.save_every == 0:
            where = {"step": step + 1, "before": before, "metrics": metrics}
            save_checkpoint(accelerator, args, where)
    after = evaluate_policy(models, eval_loader, args, settings)
    save_model(accelerator, policy, tokenizer, args.output_dir)
    pairs = (("before", before), ("after", after))
    result = {f"{k}_{when}": round(d[k], 4) for k in before for when, d in pairs}
    result.update(kl=round(metrics["ppo/kl"], 4), reward_mode=args.reward_mode)
    return finish_run(args, accelerator, {**result, "output_dir": RUN["given"]})


def prompt_batches(accelerator, loader, first, steps):
    """(step, prompt batch) for steps first .. steps - 1. A pass over the prompts is an epoch of
    the loader, its order set by the epoch; a resumed run skips what its epoch has done."""
    for step in range(first, steps):
        epoch, i = divmod(step, len(loader))
        if i == 0 or step == first:
            loader.set_epoch(epoch)
            batches = iter(accelerator.skip_first_batches(loader, i) if i else loader)
        yield step, next(batches)


def cat_padded(tensors):
    """Concatenate rollout chunks along the batch, right-padding (B, T) tensors with 0."""
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tensors])


@torch.no_grad()
def generate(policy, prompt_ids, prompt_mask, args, stop_ids, pad_id):
    """Sample responses. Returns prompt + response ids (`seq`) and mask (`attn`), the (B, R)
    `response`, its `mask` up to and including the first stop token, that `stop` token, and
    whether each row `stopped` at all."""
    sampling = dict(do_sample=True, top_k=0, top_p=args.top_p, temperature=args.temperature)
    limits = dict(max_new_tokens=args.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id)
    model = unwrap(policy)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's
    # From the policy's own distribution, whose log-probs PPO uses: generate() would add what a
    # generation_config.json asks (repetition_penalty, min_new_tokens, ...) and sample off-policy.
    kept, inner.generation_config = inner.generation_config, GenerationConfig()
    try:
        out = model.generate(prompt_ids, attention_mask=prompt_mask, **sampling, **limits)
    finally:
        inner.generation_config = kept
    response = out[:, prompt_ids.shape[1] :]
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=response.device))
    # Implementation detail: everything after the first stop token is masked (padding or junk).
    mask = (is_stop.long().cumsum(-1) - is_stop.long()) == 0
    attn = torch.cat([prompt_mask, mask.long()], 1)
    stop, stopped = is_stop & mask, is_stop.any(-1)
    return dict(seq=out, attn=attn, response=response, mask=mask, stop=stop, stopped=stopped)


@torch.no_grad()
def score_responses(models, sample, args):
    """The frozen models' view of sampled responses: one reference forward gives the KL
    log-probs and the entropies that segment them, one reward-model forward the values."""
    seq, attn, response = sample["seq"], sample["attn"], sample["response"]
    P = seq.shape[1] - response.shape[1]
    logits = models.ref_logits(seq, attn)
    ref_logprobs = logprobs_of(logits[:, P - 1 : -1], response, args.temperature)
    bandit = args.reward_mode == "bandit"  # one segment: no entropies needed
    entropy = torch.zeros_like(ref_logprobs) if bandit else token_entropy(logits[:, P:])
    return token_values(models.rm, seq, attn)[:, P:], entropy, ref_logprobs


@torch.no_grad()
def rollout(models, prompt_ids, prompt_mask, args, settings):
    """One rollout chunk: responses, old log-probs, values, rewards, advantages, returns (B, R)."""
    sample = generate(models.policy, prompt_ids, prompt_mask, args, models.stop_ids, models.pad_id)
    seq, attn, mask = sample["seq"], sample["attn"], sample["mask"]
    P = prompt_ids.shape[1]
    logits = forward(models.policy, seq, attn).logits[:, P - 1 : -1]
    old_logprobs = logprobs_of(logits, sample["response"], args.temperature)
    values = token_values(models.critic, seq, attn)[:, P - 1 : -1] * mask
    rm_values, entropy, ref_logprobs = score_responses(models, sample, args)
    rewards, dense, kl, ends, score = token_rewards(
        rm_values, entropy, old_logprobs, ref_logprobs, sample, args, settings
    )
    advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
    floats = dict(mask=mask.float(), stopped=sample["stopped"].float(), kl=kl.sum(-1))
    learn = dict(old_logprobs=old_logprobs, values=values, advantages=advantages, returns=returns)
    return {**sample, **floats, **learn, "ends": ends, "dense": dense, "score": score}


def ppo_update(models, mini, optimizers, args, step):
    """One clipped policy step and one clipped value step on a mini-batch; their statistics."""
    policy, critic, accelerator = models.policy, models.critic, models.accelerator
    mask = mini["mask"]
    P = mini["seq"].shape[1] - mini["response"].shape[1]
    with accelerator.accumulate(policy, critic):
        logits = forward(policy, mini["seq"], mini["attn"]).logits[:, P - 1 : -1]
        logprobs = logprobs_of(logits, mini["response"], args.temperature)
        advantages, old_values = mini["advantages"], mini["values"]
        pg_loss = policy_loss(logprobs, mini["old_logprobs"], advantages, mask, args.clip_eps)
        values = token_values(critic, mini["seq"], mini["attn"])[:, P - 1 : -1]
        v_loss = value_loss(values, old_values, mini["returns"], mask, args.value_clip)
        check_finite(accelerator, pg_loss + v_loss, "PPO loss", step)
        accelerator.backward(pg_loss + v_loss)  # disjoint parameters: one backward serves both
        accelerator.clip_grad_norm_(policy.parameters(), 1.0)
        accelerator.clip_grad_norm_(critic.parameters(), 1.0)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        log_ratio = logprobs - mini["old_logprobs"]
        clipped = (log_ratio.exp() - 1).abs() > args.clip_eps
        value_clipped = (values - old_values).abs() > args.value_clip
        return {
            "losses/policy": pg_loss.detach(),
            "losses/value": v_loss.detach(),
            "ppo/clipfrac": masked_mean(clipped.float(), mask),
            "ppo/entropy": masked_mean(token_entropy(logits.float() / args.temperature), mask),
            # k3 estimator of KL(old || new): E[(r - 1) - log r], r = pi_new / pi_old, always >= 0
            "ppo/approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask),
            "ppo/value_clipfrac": masked_mean(value_clipped.float(), mask),
        }


def ppo_metrics(accelerator, tokenizer, data, stats, prompts, args):
    """One metrics row, averaged over the processes: rollout, losses, diagnostics, toy score."""
    mask, ends = data["mask"], data["ends"].float()
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)  # noqa: E731
    # explained variance of the critic: 1 - Var(returns - values) / Var(returns)
    explained = 1 - var(data["returns"] - data["values"]) / var(data["returns"]).clamp(min=1e-8)
    m = {
        "ppo/reward": data["score"].mean(),
        "ppo/kl": data["kl"].mean(),
        "ppo/response_length": mask.sum(-1).mean(),
        "segment/per_response": ends.sum(-1).mean(),
        "segment/mean_length": mask.sum() / ends.sum().clamp(min=1),
        "ppo/stopped": data["stopped"].mean(),
        **{k: torch.stack([s[k] for s in stats]).mean() for k in stats[0]},
        "ppo/explained_variance": explained,
    }
    if not args.dataset:  # the exact checker exists for the toy task only
        m["ppo/toy_score"] = sum(toy_scores(tokenizer, prompts, data)) / len(prompts)
    # every value averaged over the processes in one call: one host sync
    as_float = functools.partial(torch.as_tensor, dtype=torch.float, device=mask.device)
    means = accelerator.reduce(torch.stack([as_float(v) for v in m.values()]), "mean")
    return {**dict(zip(m, means.tolist())), "processes": accelerator.num_processes}


@torch.no_grad()
def evaluate_policy(models, eval_loader, args, settings):
    """Mean reward-model score, exact toy score (toy task only) and flawed rate on held-out
    prompts, with the same sampling noise before and after training."""
    torch.manual_seed(args.seed + 1)
    accelerator, scores, toy = models.accelerator, [], []
    for batch in eval_loader:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        sample = generate(models.policy, ids, mask, args, models.stop_ids, models.pad_id)
        rm_values, entropy, ref_logprobs = score_responses(models, sample, args)
        out = token_rewards(rm_values, entropy, ref_logprobs, ref_logprobs, sample, args, settings)
        scores.append(accelerator.gather_for_metrics(out[-1]))
        toy += toy_scores(models.tokenizer, batch["prompt_text"], sample)
    result = {"reward": torch.cat(scores).mean().item()}
    if not args.dataset:
        toy = torch.tensor(accelerator.gather_for_metrics(toy), dtype=torch.float)
        result.update(toy_score=toy.mean().item(), flawed_rate=(toy < 1).float().mean().item())
    return result


def ppo_data(args):
    """The reward model's settings, the accelerator, the tokenizer and the prompt loaders."""
    settings = load_rm_settings(toy_model(args.reward_model))  # the toy's is trained on first use
    resolve_reward(args, settings)
    accelerator = make_accelerator(args)
    tokenizer = load_tokenizer(reference_model(args, settings))
    tokenizer.padding_side = "left"  # Implementation detail: batched generation pads on the left
    train_ds, eval_ds = prompt_splits(args, tokenizer)
    if args.episodes > 0:
        args.steps = max(1, int(args.episodes * len(train_ds)) // args.batch_size)

    def collate(rows):
        ids = tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt")
        return {**ids, "prompt_text": [r["prompt_text"] for r in rows]}

    # The loaders get their own generator: drawing from the global RNG that sampling uses would
    # make a resumed run sample differently from an uninterrupted one. The order is set per epoch.
    shuffled = dict(shuffle=True, drop_last=True, generator=torch.Generator())
    loader = DataLoader(train_ds, args.batch_size, collate_fn=collate, **shuffled)
    eval_loader = DataLoader(eval_ds, args.rollout_chunk, collate_fn=collate)
    loader, eval_loader = accelerator.prepare(loader, eval_loader)
    return accelerator, tokenizer, settings, loader, eval_loader


def ppo_models(args, accelerator, settings, tokenizer):
    """Actor = SFT policy; critic = SFT backbone + zero head; frozen reward model; reference =
    frozen SFT policy (with LoRA: the policy with its adapters off, no second copy). One record,
    since every rollout reads them all, with the ids that end a generation."""
    path = reference_model(args, settings)
    _, ref, rm = load_scorers(path, args.reward_model, args.bf16, with_ref=not args.lora_rank)
    frozen_bf16 = args.bf16 and args.lora_rank > 0  # LoRA: base weights never train, keep bf16
    policy = load_model(path, "causal", frozen_bf16, tokenizer)
    critic = init_head(load_model(path, "value", frozen_bf16), args.head_init, critic=True)
    m = types.SimpleNamespace(policy=trainable(policy, args, "causal"), path=path)
    m.critic, m.rm = trainable(critic, args, "value"), rm.to(accelerator.device)
    ref = ref.to(accelerator.device) if ref is not None else None

    def ref_logits(seq, attn):
        if ref is not None:
            return forward(ref, seq, attn).logits
        with unwrap(m.policy).disable_adapter():
            return forward(m.policy, seq, attn).logits

    m.ref_logits, m.accelerator, m.tokenizer = ref_logits, accelerator, tokenizer
    end_id = end_token_id(tokenizer, settings["end_token"], args.reward_model)  # see check_fits
    eos = policy.generation_config.eos_token_id  # an id, a list, or None
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) for i in eos):
        fail(f"{path}: generation_config.json's eos_token_id must be token ids, got {eos}")
    m.pad_id, m.stop_ids = tokenizer.pad_token_id, sorted({end_id, *eos})
    return m


# ----------------------------------------------------------------------------------------------
# SFT: the toy's first stage (the paper starts from released SFT models). Loss on response tokens.


def sft(args):
    accelerator = make_accelerator(args)
    if args.model:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, tokenizer=tokenizer)
    else:
        tokenizer, model = build_toy(args.toy_lists)
    loader = sft_loader(args, tokenizer)
    total = args.epochs * math.ceil(len(loader) / args.grad_accum)
    optimizer, scheduler = make_optimizer(model, args, total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if done := start_run(args, "sft", accelerator, [args.model, args.dataset]):
        return done
    model.train()
    quiet = not accelerator.is_local_main_process
    bar = tqdm(total=args.epochs * len(loader), desc="sft", disable=quiet)
    for epoch in range(args.epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                ids, mask = batch["input_ids"], batch["attention_mask"]
                loss = forward(model, ids, mask, labels=batch["labels"]).loss
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            bar.update()
            if bar.n % 20 == 0:  # a host sync only now and then
                bar.set_postfix(loss=f"{loss.item():.3f}")
        log_metrics(args, accelerator, {"epoch": epoch + 1, "sft/loss": loss.item()})
    bar.close()
    save_model(accelerator, model, tokenizer, args.output_dir)
    result = {"sft/loss": round(loss.item(), 4), "output_dir": RUN["given"]}
    return finish_run(args, accelerator, result)


def sft_loader(args, tokenizer):
    """SFT examples (the toy's, or a dataset's `completion` / `chosen`): labels on the response."""
    if args.dataset:
        ds = load_rows(args.dataset)
    else:
        rows = toy_sft_rows(3000, args.flaw_rate, args.seed, args.toy_lists)
        ds = datasets.Dataset.from_list(rows)
    key = next((k for k in ("completion", "chosen", "messages") if k in ds.column_names), "")
    check_columns(ds, [key or "completion"])
    end_id = end_token_id(tokenizer, args.end_token)

    def encode_row(row, i):
        prompt, response = split_conversation(row, key, tokenizer, i)
        prompt_ids, response_ids = encode(tokenizer, prompt, response, args.max_prompt_len, end_id)
        ids = (prompt_ids + response_ids)[: args.max_len]
        labels = ([-100] * len(prompt_ids) + response_ids)[: args.max_len]
        cut = len(labels) < len(prompt_ids + response_ids)
        return {"input_ids": ids, "labels": labels, "cut": cut}

    ds = ds.map(encode_row, with_indices=True, remove_columns=ds.column_names)
    if cut := sum(ds["cut"]):  # trained on, but never on their end token
        say(f"sft: {cut} of {len(ds)} examples cut at --max-len {args.max_len}, end token and all")
    ds = ds.remove_columns("cut")
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True)  # labels padded with -100
    return DataLoader(ds, args.batch_size // args.grad_accum, shuffle=True, collate_fn=collate)


# ----------------------------------------------------------------------------------------------
# Seeing what the method sees: responses cut into their segments, with their rewards. The
# terminal view, the HTML page and the normalizer plot are drawn by benchmarks/extras.py.


def segment_rewards(reward_model, conversations, model="", batch_size=16):
    """Segments, segment rewards and score (their mean, what the model ranks by; not the pooled
    logit of AutoModelForSequenceClassification) of (prompt, response) pairs or conversations
    ending with the assistant's turn. `model`: the reference model, if the recorded one moved."""
    settings = load_rm_settings(reward_model)
    tokenizer, ref, rm = load_scorers(model or settings["reference_model"], reward_model)
    rows = [
        {"prompt": c[0], "response": c[1]} if isinstance(c, tuple) else {"response": c}
        for c in conversations
    ]
    pairs = [split_conversation(row, "response", tokenizer) for row in rows]
    end_id = end_token_id(tokenizer, settings["end_token"], reward_model)
    cut = cut_segments(tokenizer, ref, rm, pairs, settings["entropy_threshold"], end_id, batch_size)
    out = []
    for segments in cut:
        rewards = [s["reward"] for s in segments]
        score = sum(rewards) / max(len(rewards), 1)
        out.append({"segments": [s["text"] for s in segments], "rewards": rewards, "score": score})
    return out


@torch.no_grad()
def cut_segments(tokenizer, ref, rm, pairs, threshold, end_id, batch_size=16):
    """Each (prompt, response) cut into its segments: text, tokens, per-token entropies, the
    entropy at the segment's end and, with a reward model, its reward. end_id None: raw text
    (no end token; every token is content)."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        encoded = [encode(tokenizer, p, r, 10**9, end_id) for p, r in chunk]
        seqs, pad = [p + r for p, r in encoded], tokenizer.pad_token_id
        ids, mask = pad_right(seqs, pad), pad_right([[1] * len(s) for s in seqs], 0)
        entropy = reference_entropy(ref, ids, mask)
        pos = torch.arange(ids.shape[1])
        first = torch.tensor([len(p) for p, _ in encoded])[:, None]
        # content: the response, minus its end token except for the bandit (read at the end token)
        last = torch.tensor([len(s) for s in seqs])[:, None]
        last -= int(end_id is not None and not math.isinf(threshold))
        ends = segment_ends(entropy, (pos >= first) & (pos < last), threshold)
        values = token_values(rm, ids, mask).tolist() if rm is not None else [None] * len(seqs)
        entropy = entropy.tolist()
        for k, (p, _) in enumerate(encoded):
            stops = ends[k].nonzero().squeeze(1).tolist()
            segments = []
            for a, b in zip([len(p)] + [s + 1 for s in stops[:-1]], stops):
                span = ids[k, a : b + 1].tolist()
                seg = {
                    "text": tokenizer.decode(span),
                    "entropy": round(entropy[k][b], 3),
                    "tokens": tokenizer.batch_decode([[t] for t in span]),  # one call a segment
                    "token_entropy": [round(h, 3) for h in entropy[k][a : b + 1]],
                }
                if values[k] is not None:
                    seg["reward"] = round(values[k][b], 3)
                segments.append(seg)
            out.append(segments)
    return out


def segment(args):
    """The `segment` subcommand: print (and draw) responses cut into their segments: --text
    (raw, no template, no end token), --prompt / --response, the chosen and rejected responses of
    a --dataset row, or the toy's demo pair when no input is given."""
    given = [f"--{k}" for k in ("text", "response", "dataset") if getattr(args, k) is not None]
    if args.prompt is not None and args.response is None:
        fail("--prompt needs --response: the response is what gets segmented")
    if len(given) > 1:
        fail(f"{' and '.join(given)} are two inputs: pass one of them")
    settings = load_rm_settings(args.reward_model) if args.reward_model else {}
    if settings:
        check_fits(args, settings)
    threshold = args.entropy_threshold
    threshold = settings.get("entropy_threshold", 1.0) if threshold is None else threshold
    model_path = reference_model(args, settings) if settings else toy_model(args.model or TOY_SFT)
    inputs = [model_path, args.reward_model, args.dataset]
    page = args.html and output_path(args.html, inputs, "--html")
    tokenizer, ref, rm = load_scorers(model_path, args.reward_model)
    demo = [{"role": "user", "content": TOY_DEMO[0]}]
    shown = [("chosen", demo, TOY_DEMO[1]), ("rejected", demo, TOY_DEMO[2])]
    if args.text is not None:
        shown = [("text", "", args.text)]
    elif args.response is not None:
        shown = [("response", as_messages(args.prompt or "", tokenizer, "--prompt"), args.response)]
    elif args.dataset is not None:
        rows = load_rows(args.dataset)
        if not 0 <= args.row < len(rows):
            fail(f"--row {args.row} is outside the dataset's {len(rows)} rows")
        pair = "rejected" in rows.column_names  # implicit pairs too, as train-rm reads them
        check_columns(rows, ["chosen", "rejected"] if pair else ["chosen"])
        row, name = rows[args.row], f"row {args.row}"
        if pair:
            prompt, chosen, rejected = split_pair(row, tokenizer, args.row)
            shown = [(f"{name}, chosen", prompt, chosen), (f"{name}, rejected", prompt, rejected)]
        else:
            shown = [(f"{name}, chosen", *split_conversation(row, "chosen", tokenizer, args.row))]
    if not all(response.strip() for _, _, response in shown):
        fail(f"the {shown[0][0]} is empty")
    end = args.end_token or settings.get("end_token", "")
    end_id = end_token_id(tokenizer, end, args.reward_model) if args.text is None else None
    cut = cut_segments(tokenizer, ref, rm, [(p, r) for _, p, r in shown], threshold, end_id)
    views = [
        {"title": t, "prompt": p if isinstance(p, str) else p[-1]["content"], "segments": segs}
        for (t, p, _), segs in zip(shown, cut)  # a prompt as text ends in the assistant header
    ]
    from benchmarks import extras

    color = sys.stdout.isatty()
    for view in views:
        print(f"{view['title']}:\n{extras.segments_terminal(view['segments'], color)}")
    if page:
        with atomic(page) as tmp, open(tmp, "w") as f:
            f.write(extras.segments_html(views, threshold))
    keys = ("text", "entropy", "reward")
    for v in views:
        v["segments"] = [{k: s[k] for k in keys if k in s} for s in v["segments"]]
    return {"entropy_threshold": threshold, "segments": views[0]["segments"], "views": views}


# ----------------------------------------------------------------------------------------------
# The embedded toy task: "Name 7 fruits." -> "Fruits: apple, cherry, fig, kiwi, lemon, mango, plum."
# Each item is right or wrong on its own and an answer has 6-8 of them: which item made an answer
# worse is what segment rewards can tell PPO and one reward per answer cannot (docs/toy.md: design
# notes). --toy-lists N asks for N lists of distinct categories in one answer, for the same task
# at N times the length: "Name 8 birds, 7 fruits and 6 tools." -> "Birds: ... Fruits: ... Tools:".

TOY_SFT, TOY_RM, TOY_PPO = "runs/toy-sft", "runs/toy-rm", "runs/toy-ppo"
LOOK_SFT, LOOK_RM = "runs/look-sft", "runs/look-rm"  # `ppo --preset look`: a two-minute look
TOY_LOOK = {  # the same pipeline with fewer epochs and PPO steps
    "sft": {"epochs": 4, "output_dir": LOOK_SFT},
    "train-rm": {"epochs": 1, "model": LOOK_SFT, "output_dir": LOOK_RM},
    "fit-norm": {"reward_model": LOOK_RM},
    # a 1-epoch reward model is exploited sooner: a gentler actor lr than ppo's (docs/toy.md)
    "ppo": {"steps": 30, "lr": 3e-5, "reward_model": LOOK_RM, "output_dir": "runs/look-ppo"},
}
CATEGORIES = {  # six categories of 9-10 items, each one BPE token
    "fruits": "apple cherry fig grape kiwi lemon mango melon pear plum".split(),
    "colors": "beige black blue brown cyan gray green pink red white".split(),
    "animals": "bear cat cow deer dog fox goat horse lion tiger".split(),
    "tools": "axe chisel clamp drill file hammer pliers rake saw".split(),
    "metals": "brass bronze copper gold iron lead nickel silver tin".split(),
    "drinks": "beer cider cocoa coffee juice milk soda tea water wine".split(),
}
LONG_CATEGORIES = {  # two more for answers of 7-8 lists; one list draws from the six only
    **CATEGORIES,
    "birds": "crow dove duck eagle goose hawk owl raven swan".split(),
    "trees": "ash beech birch cedar elm fir maple oak pine".split(),
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


def toy_prompt(rng, lists=1):
    """'Name 7 fruits.', or with lists > 1 'Name 8 birds, 7 fruits and 6 tools.' (categories in
    alphabetical order: a model this small did not learn to copy an order of 8 from the prompt);
    and the asks: [(8, 'birds'), ...]."""
    if lists == 1:  # (the draws of the quick start's task, kept as they were)
        asks = [(rng.choice(TOY_COUNTS), rng.choice(sorted(CATEGORIES)))]
    else:
        categories = sorted(rng.sample(sorted(LONG_CATEGORIES), lists))
        asks = [(rng.choice(TOY_COUNTS), category) for category in categories]
    named = [f"{n} {category}" for n, category in asks]
    head = ", ".join(named[:-1]) + " and " if lists > 1 else ""
    return f"Name {head}{named[-1]}.", asks


def toy_response(rng, asks, flaw_rate=0.0, flaws=TOY_FLAWS):
    """One list per ask. A right list names n distinct items of its category in alphabetical order
    (so a small model avoids repeats by looking at the item before). Each item is flawed with
    probability flaw_rate: 'wrong' (another category's item), 'garbled' (random letters: text that
    is no item at all, which PPO would otherwise be free to try) or 'repeat' (the item before,
    again). With probability flaw_rate a list also has one item too many or too few ('count').
    `flaws`: the kinds drawn."""
    pool = CATEGORIES if len(asks) == 1 else LONG_CATEGORIES
    kinds = [f for f in flaws if f in TOY_ITEM_FLAWS]
    lists = []
    for n, category in asks:
        k = n + (rng.choice((-1, 1)) if "count" in flaws and rng.random() < flaw_rate else 0)
        items = sorted(rng.sample(pool[category], k))
        for i in range(k):
            if not kinds or rng.random() >= flaw_rate:
                continue
            flaw = rng.choices(kinds, [TOY_ITEM_FLAWS[f] for f in kinds])[0]
            if flaw == "repeat" and i > 0:
                items[i] = items[i - 1]
            elif flaw == "garbled":
                items[i] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))
            else:  # 'wrong', or a 'repeat' drawn for the first item
                other = rng.choice([c for c in sorted(pool) if c != category])
                items[i] = rng.choice(pool[other])
        lists.append(f"{category.capitalize()}: {', '.join(items)}.")
    return " ".join(lists)


def toy_read(prompt, response):
    """[(n asked, labels), ...] per asked list; labels: one boolean per listed item, True for an
    item of the asked category that no earlier item of its list repeats; a list that is not
    'item, item, ... .' has n False labels (no credit for its items; the other lists keep
    theirs). None when the headers ('Fruits: ') are not the asked ones, in order, a space
    apart."""
    named = re.fullmatch(r"Name (\d+ \w+(?:, \d+ \w+)*(?: and \d+ \w+)?)\.", prompt.strip())
    response = response.strip()
    heads = list(re.finditer(r"(?:^|(?<= ))([A-Z]\w*): ", response))
    asks = re.findall(r"(\d+) (\w+)", named.group(1)) if named else []
    headers = [m.group(1) for m in heads] == [c.capitalize() for _, c in asks]
    if not (asks and headers) or heads[0].start() > 0:  # or text before the first header
        return None
    ends = [m.start() for m in heads[1:]] + [len(response)]
    read = []
    for (n, category), head, end in zip(asks, heads, ends):
        body = response[head.end() : end].rstrip(" ")
        if not re.fullmatch(r"\w+(?:, \w+)*\.", body):
            read.append((int(n), [False] * int(n)))
            continue
        items, known = body[:-1].split(", "), LONG_CATEGORIES.get(category, [])
        read.append((int(n), [x in known and x not in items[:i] for i, x in enumerate(items)]))
    return read


def toy_item_labels(prompt, response):
    """The labels of toy_read, all lists in one: one boolean per item of the answer; or None."""
    read = toy_read(prompt, response)
    return None if read is None else [ok for _, labels in read for ok in labels]


def toy_counts(prompt, response):
    """(correct, max(asked, given)) summed over the lists; None if malformed. Items past the asked
    count are not correct: in a list of 8 where 7 were asked, at most 7 are."""
    read = toy_read(prompt, response)
    if read is None:
        return None
    right = sum(min(sum(labels), n) for n, labels in read)
    return right, sum(max(n, len(labels)) for n, labels in read)


def toy_score(prompt, response):
    """Exact quality in [0, 1]: correct items / max(asked, given), both summed over the lists; 0 if
    malformed. Partial credit: each item fixed moves it by 1/(items asked)."""
    counts = toy_counts(prompt, response)
    return counts[0] / counts[1] if counts else 0.0


def toy_scores(tokenizer, prompts, sample):
    """The exact toy score of each sampled response: its tokens up to its stop token."""
    rows = zip(sample["response"], sample["mask"].bool() & ~sample["stop"])
    texts = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in rows]
    return [toy_score(p, t) for p, t in zip(prompts, texts)]


def toy_flaws(prompt, response):
    """Flaws of an answer, max(asked, given) - correct summed over the lists: a wrong item, a
    repeat, one too many and one too few each count one; inf if malformed."""
    counts = toy_counts(prompt, response)
    return counts[1] - counts[0] if counts else math.inf


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
        if len(item_ends) != len(labels):  # a broken list: no item to read its segment off
            continue
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
        say("segment_accuracy: none, a bandit reward model gives one reward per answer")
        return {"segment_accuracy": None}
    ref, rm = load_model(model_path).eval(), load_model(args.output_dir, "value").eval()
    end_id = end_token_id(tokenizer, args.end_token)
    rows = toy_preference_rows(args.eval_size, seed=-1, lists=args.toy_lists)
    accuracy = toy_segment_accuracy(tokenizer, ref, rm, rows, args.entropy_threshold, end_id)
    return {"segment_accuracy": round(accuracy, 4)}


def toy_preference_rows(n, seed=0, lists=1):
    """Pairs (prompt, chosen, rejected): two answers to one prompt, each with its own per-item flaw
    rate; chosen has fewer flaws (ties dropped). Both may be imperfect, so which items decide the
    preference is for the reward model to find out, as in real preference data."""
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        prompt, asks = toy_prompt(rng, lists)
        a, b = (toy_response(rng, asks, rng.choice(TOY_PAIR_FLAW_RATES)) for _ in "ab")
        fa, fb = toy_flaws(prompt, a), toy_flaws(prompt, b)
        if fa != fb:
            chosen, rejected = (a, b) if fa < fb else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def toy_sft_rows(n, flaw_rate, seed=0, lists=1):
    """SFT targets, each item wrong or garbled with probability flaw_rate, never a repeat or a
    wrong count: the SFT model makes mistakes at about that rate, which leaves PPO work to do, and
    rarely tries what its reward model judges worst (docs/toy.md: design notes)."""
    rng, rows = random.Random(seed + 1), []
    for _ in range(n):
        prompt, asks = toy_prompt(rng, lists)
        completion = toy_response(rng, asks, flaw_rate, ("wrong", "garbled"))
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def toy_prompt_rows(n, seed=0, lists=1):
    rng = random.Random(seed + 2)
    return [{"prompt": toy_prompt(rng, lists)[0]} for _ in range(n)]


def build_toy(lists=1):
    """The toy's tokenizer and model, no download: a byte-level BPE trained on the toy corpus,
    with a chat template (toy and hub models then share every code path: apply_chat_template, end
    token, padding), and a ~0.8M-parameter Llama from a config."""
    rows = toy_preference_rows(2000, seed=123, lists=lists)
    corpus = [r["prompt"] + " " + r["chosen"] + " " + r["rejected"] for r in rows]
    special = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    tokens = dict(pad_token="<pad>", eos_token="<|end|>", chat_template=TOY_CHAT_TEMPLATE)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    sizes = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4)
    sizes.update(num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=None, **sizes, **ids)
    return tokenizer, LlamaForCausalLM(config)


def toy_model(path):
    """`path`; if it is one of the toy's models (the quick start's or the look's) and not there
    yet, first trained there, never over another run, with a line on how it went."""
    built = {TOY_SFT: ["sft"], TOY_RM: ["train-rm"], LOOK_SFT: ["sft"], LOOK_RM: ["train-rm"]}
    argv = built.get(path)
    done = os.path.isfile(os.path.join(path, "config.json"))
    if argv is None or done and (argv == ["sft"] or has_settings(path)):
        return path
    look = ["--preset", "look"] if path in (LOOK_SFT, LOOK_RM) else []
    command, args = parse_args([*argv, *look, "--output-dir", path])
    if command == "train-rm":  # its SFT model first
        toy_model(args.model or TOY_SFT)
    from benchmarks.extras import stage_line  # what the quick start says of each stage

    say(f"{command}: building {path} ...")
    start = time.perf_counter()
    result = COMMANDS[command][1](resolve(command, args))
    say(stage_line(args, command, result, time.perf_counter() - start, look))
    return path


# ----------------------------------------------------------------------------------------------
# Plumbing from here on. Data: preference and prompt datasets in TRL's layouts, chat template,
# end token appended, lengths checked.


def fail(msg):
    """Bad input: one clear line (a newline in a path too) and a non-zero exit, no traceback."""
    raise SystemExit(f"segment_rlhf: error: {msg}".replace("\n", "\\n"))


def say(msg=""):
    """A line for the user on stderr (stdout holds the closing JSON line)."""
    print(msg, file=sys.stderr)


def load_rows(name, split="train"):
    """A hub id, a saved dataset folder or a local json/jsonl/parquet file, through `datasets`."""
    ext = os.path.splitext(name)[1].lstrip(".").lower()  # .JSONL too
    file = ext in ("json", "jsonl", "parquet") and not os.path.isdir(name)  # rows.jsonl/: a folder
    if file and not os.path.isfile(name):
        fail(f"dataset file {name} does not exist")
    if not (file or os.path.isdir(name) or is_hub_id(name)):
        fail(f"dataset {name!r} is neither a hub id (org/name) nor a .json/.jsonl/.parquet file")
    if os.path.isdir(name) and glob.escape(name) != name:  # datasets would read it as a pattern
        fail(f"dataset folder {name}: datasets reads *, ? and [ in a folder's path; rename it")
    # a file's name is escaped: datasets reads "pairs[1].jsonl" as a pattern matching pairs1.jsonl
    builder, files = (ext.replace("jsonl", "json"), glob.escape(name)) if file else (name, None)
    # datasets knows a local file by its size and time: one edited in place came back from its
    # old cache. A cache of its own per content cannot be stale.
    where = None if is_hub_id(name) else cache_dir(os.path.join("data", stamp(name)), [name])
    try:
        ds = datasets.load_dataset(builder, data_files=files, split=split, cache_dir=where)
    except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as e:
        if isinstance(cause := e.__cause__ or e.__context__, OSError):  # a full disk, say
            fail(f"could not read {name}: {first_line(cause)}")
        what = f"{ext} records, one per example" if file else "a dataset"
        fail(f"could not read {name}: it must hold {what} ({first_line(e)})")
    return ds if len(ds) else fail(f"dataset {name} has no rows")


def split_pair(row, tokenizer, i):
    """(prompt, chosen, rejected) of a row in any of TRL's layouts; conversations through TRL's
    maybe_extract_prompt (which also undoubles UltraFeedback's prompt). Full texts: TRL cuts at the
    first differing character, which can split a word ("k|iwi"): here it backs up to a space."""
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str) and row.get("prompt") is None:
        shared = os.path.commonprefix([chosen, rejected])
        prompt = shared[: max(shared.rfind(" "), shared.rfind("\n"), 0)]
        return prompt, chosen[len(prompt) :], rejected[len(prompt) :]
    if isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected:
        # TRL takes a string prompt beside two conversations for a copy of their first turns
        # (UltraFeedback's layout); where it is none, extracting them would drop the prompt
        extracted, prompt = maybe_extract_prompt(row), row.get("prompt")
        turns = extracted["prompt"]
        last = turns[-1] if isinstance(turns, list) and turns else None
        if not isinstance(prompt, str) or isinstance(last, dict) and last.get("content") == prompt:
            row = extracted
    prompt, chosen = split_conversation(row, "chosen", tokenizer, i)
    other, rejected = split_conversation(row, "rejected", tokenizer, i)
    if other != prompt:  # a pair compares two answers to one prompt
        fail(f"row {i}: chosen and rejected have different prompts")
    return prompt, chosen, rejected


def split_conversation(row, key, tokenizer, index=0):
    """(prompt, response): `key` a string, or the assistant's last turn (after `prompt`, if any)."""
    value, where = row[key], f"row {index}, column {key!r}"
    earlier, response = [], value
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            fail(f"{where}: a conversation must end with an assistant turn")
        earlier, response = value[:-1], value[-1].get("content")
    if not isinstance(response, str):
        fail(f"{where}: message contents must be strings")
    return as_messages(row.get("prompt"), tokenizer, where, earlier), response


def as_messages(prompt, tokenizer, where, earlier=()):
    """A prompt as messages (a string: one user turn), or as text if it ends in the assistant's."""
    header = assistant_header(tokenizer)
    if isinstance(prompt, str) and header and prompt.rstrip().endswith(header):
        return prompt
    if prompt is not None and not isinstance(prompt, (str, list)):
        fail(f"{where}: the prompt must be a string or a message list, got {prompt!r}")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt or []
    messages = [*messages, *earlier]
    if not messages:
        fail(f"{where}: a conversation needs a prompt before the assistant's turn")
    for turn in messages:  # every turn holds a string role and content
        fields = [turn.get("role"), turn.get("content")] if isinstance(turn, dict) else [None]
        if not all(isinstance(v, str) for v in fields):
            fail(f"{where}: every turn needs a string 'role' and 'content', got {turn!r}")
    return messages


@functools.cache  # one tokenizer, one header: not two template renders for every row
def assistant_header(tokenizer):
    """What add_generation_prompt appends to a conversation, e.g. '<|assistant|>'."""
    turn = [{"role": "user", "content": "x"}]
    bare = tokenizer.apply_chat_template(turn, tokenize=False)
    ready = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return ready[len(bare) :].strip()


def check_columns(ds, keys):
    """Explicit layouts need `prompt` + keys; conversational and implicit pairs need only keys."""
    found = ds.column_names
    explicit = "prompt" in found or keys == ["chosen", "rejected"]  # or implicit
    if set(keys) - set(found) or not (explicit or isinstance(ds[0][keys[0]], list)):
        fail(f"dataset needs columns {['prompt', *keys]} (or conversational {keys}); found {found}")


def encode(tokenizer, prompt, response, max_prompt_len, end_id):
    """Token ids of the prompt (messages through the chat template, or text as it is) cut from
    the left, and of the response followed by the end token (none when end_id is None). The two
    are tokenized apart, not as one templated text (TRL's maybe_apply_chat_template): segments
    are read at the response's own tokens, which a merge across the seam would move."""
    text = prompt
    if isinstance(prompt, list):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_len:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids + ([] if end_id is None else [end_id])


def end_token_id(tokenizer, end_token="", rm=None):
    """The id of the token that closes every response: --end-token, reward model rm's, or eos."""
    token = end_token or tokenizer.eos_token
    token_id = tokenizer.convert_tokens_to_ids(token) if token else None
    if token_id is None or token_id == tokenizer.unk_token_id:
        fix = f"{rm}'s settings name it: retrain with train-rm" if rm else "pass --end-token"
        fail(f"end token {token!r} is not in the tokenizer's vocabulary; {fix}")
    return token_id


def pad_right(seqs, value):
    width = max(len(s) for s in seqs)  # id lists -> a (B, T) tensor, right-padded
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


def prepare_pairs(ds, tokenizer, args, end_id):
    """Token ids of prompt / chosen / rejected; unusable pairs are skipped and counted."""
    check_columns(ds, ["chosen", "rejected"])
    # The map reads these flags alone, so its fingerprint, the key of the entropy cache
    # (add_entropies), follows them and not --lr or --output-dir: no needless recompute.
    max_prompt_len, max_len, long_pairs = args.max_prompt_len, args.max_len, args.long_pairs

    def encode_row(row, i):
        prompt, chosen, rejected = split_pair(row, tokenizer, i)
        prompt_ids, chosen_ids = encode(tokenizer, prompt, chosen, max_prompt_len, end_id)
        rejected_ids = encode(tokenizer, prompt, rejected, max_prompt_len, end_id)[1]
        if long_pairs == "truncate":  # the authors' way: cut, and end on the end token
            room = max_len - len(prompt_ids)
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            chosen_ids[-1] = rejected_ids[-1] = end_id
        skip, blank = "", not (chosen.strip() and rejected.strip())
        if not prompt_ids:
            skip = "no prompt (implicit layout without a shared prefix)"
        elif min(len(chosen_ids), len(rejected_ids)) < 2 or blank:
            skip = "empty response"
        elif chosen_ids == rejected_ids:
            skip = "chosen identical to rejected"
        elif len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_len:
            skip = f"longer than --max-len {max_len}"
        ids = dict(prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids)
        return {**ids, "skip": skip}

    ds = ds.map(encode_row, with_indices=True, remove_columns=ds.column_names)
    skipped = {reason: ds["skip"].count(reason) for reason in set(ds["skip"]) - {""}}
    if skipped:
        say(f"skipped pairs: {skipped}")
    ds = ds.filter(lambda r: not r["skip"]).remove_columns("skip")
    if len(ds) == 0:
        fail(f"no usable preference pairs left after filtering; skipped: {skipped}")
    return ds


def rm_pairs(args, tokenizer):
    """The preference dataset (or the toy one), encoded and filtered, and more than --eval-size."""
    if args.dataset:
        ds = load_rows(args.dataset)
    else:
        ds = datasets.Dataset.from_list(toy_preference_rows(2200, args.seed, args.toy_lists))
    ds = prepare_pairs(ds, tokenizer, args, end_token_id(tokenizer, args.end_token))
    if not 0 < args.eval_size < len(ds):
        fail(f"--eval-size {args.eval_size} must be between 1 and the {len(ds)} usable pairs - 1")
    return ds


def prompt_splits(args, tokenizer):
    """Prompts (ids, and the last user turn as text), the last --eval-prompts held out: a `prompt`
    column (text or messages), or a conversation (`chosen` / `messages`) minus its answer."""
    need = "a 'prompt' column or a conversational 'chosen' / 'messages'"
    if args.dataset:
        ds = load_rows(args.dataset)
    else:  # toy: training prompts follow --seed; the held-out ones are the same for every seed
        rows = toy_prompt_rows(20 * args.batch_size, args.seed, args.toy_lists)
        held_out = toy_prompt_rows(args.eval_prompts, seed=-1, lists=args.toy_lists)
        ds = datasets.Dataset.from_list(rows + held_out)
    key = next((k for k in ("prompt", "chosen", "messages") if k in ds.column_names), None)
    if key is None:
        fail(f"prompt dataset needs {need}; found {ds.column_names}")

    def encode_prompt(row, i):
        value, where = row[key], f"row {i}, column {key!r}"
        answered = isinstance(value, list) and value and isinstance(value[-1], dict)
        if key == "chosen" and "rejected" in row:  # a preference pair: the prompt it shares
            prompt = split_pair(row, tokenizer, i)[0]
        elif key != "prompt" and answered and value[-1].get("role") == "assistant":
            prompt = split_conversation({key: value}, key, tokenizer, i)[0]  # minus its answer
        else:
            prompt = as_messages(value, tokenizer, where)
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        ids = encode(tokenizer, prompt, "", args.max_prompt_len, None)[0]
        if not ids:  # implicit pairs without a shared prefix
            fail(f"{where}: the pair has no prompt (its texts share no prefix)")
        return {"prompt_text": text, "input_ids": ids}

    ds = ds.map(encode_prompt, with_indices=True, remove_columns=ds.column_names)
    if len(ds) <= args.eval_prompts + args.batch_size:
        sizes = f"--eval-prompts + --batch-size ({args.eval_prompts} + {args.batch_size})"
        fail(f"{len(ds)} prompts: need more than {sizes}")
    n_train = len(ds) - args.eval_prompts
    return ds.select(range(n_train)), ds.select(range(n_train, len(ds)))


# ----------------------------------------------------------------------------------------------
# Models: loading (each folder checked as it loads), forward, LoRA, optimizer, saving.


def is_hub_id(path):
    """org/name, and nothing on disk by that name: a local path is never taken for a hub id."""
    return bool(re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path)) and not os.path.exists(path)


def model_folder(path):
    """A model directory or hub id as it is; a .gguf file converted once into a plain folder."""
    if path.endswith(".gguf") and os.path.isfile(path):
        from benchmarks.extras import gguf_folder  # converted on first use, into the cache

        try:
            return gguf_folder(os.path.abspath(path), cache_dir("gguf", [path]))
        except (ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
            fail(f"could not read the GGUF file {path}: {first_line(e)}")
    if not os.path.isdir(path) and not is_hub_id(path):
        what = "is not a model folder" if os.path.exists(path) else "does not exist"
        fail(f"model {path!r} {what} (pass a directory, a .gguf file or a hub id)")
    real, cache = os.path.realpath(path), cache_home()  # models load before any cache is written
    if os.path.isdir(real) and os.path.commonpath([real, cache]) == real:
        fail(f"$SEGMENT_RLHF_CACHE {cache} lies inside the model {path}: move one of them")
    return path


# What transformers raises for a missing, damaged or mistyped file of a model folder.
DAMAGED = (OSError, ValueError, RuntimeError, TypeError, KeyError, AttributeError, SafetensorError)
DAMAGED += (StrictDataclassError, AssertionError, IndexError)  # torch's checks of a config
DAMAGED += (pickle.UnpicklingError, EOFError)  # a pytorch_model.bin that is no torch archive


def load_tokenizer(path):
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_folder(path))
    except DAMAGED as e:  # it reads config.json too
        fail(f"could not load the tokenizer or config.json of {path!r}: {first_line(e)}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad == eos is fine: masks mark the padding
    if not str(tokenizer.chat_template or "").strip():  # none, or an empty file
        fail(f"tokenizer of {path!r} has no chat template; use an instruct/SFT model")
    return tokenizer


def load_model(path, kind="causal", bf16=False, tokenizer=None):
    """kind: 'causal' (policy, reference), 'value' (backbone + a linear head -> 1, no bias, the
    layout of AutoModelForSequenceClassification(num_labels=1), fresh for a critic or a reward
    model to train) or 'reward' (the same, its head in the weights). Loading is the check of a
    model folder: a missing, damaged or misshapen file, or a `tokenizer` of more tokens than the
    embeddings, fails here, in one line."""
    path = model_folder(path)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    try:
        config = AutoConfig.from_pretrained(path, num_labels=1)
        for key, value in config.to_dict().items():
            # Implementation detail: dropout off, else log-probs and values are noisy.
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
        dtype = torch.bfloat16 if bf16 else torch.float32
        load = dict(output_loading_info=True, ignore_mismatched_sizes=True)
        model, info = auto.from_pretrained(path, config=config, dtype=dtype, **load)
    except DAMAGED as e:
        torch_file = isinstance(e, (pickle.UnpicklingError, EOFError))  # its advice would mislead
        why = "a weights file is no torch archive" if torch_file else first_line(e)
        if torch_file or isinstance(e, SafetensorError):
            why += "; the weights are damaged or truncated"
        fail(f"could not load model {path!r}: {why}")
    # Heads may be missing or unused by design (a fresh one, or the other kind's); no other weight.
    loose = {*info["missing_keys"], *info["unexpected_keys"]} - {"score.weight", "lm_head.weight"}
    if body := sorted(k for k in loose if "head" not in k):
        fail(f"model {path}: its config.json and weights disagree, e.g. on {body[0]}")
    for name, saved, needed in info["mismatched_keys"]:
        fail(f"model {path}: {name} has shape {list(saved)}, the model needs {list(needed)}")
    if kind == "causal" and any(k.endswith("score.weight") for k in info["unexpected_keys"]):
        fail(f"{path} is a reward / value model; --model needs the SFT (causal LM) model")
    if kind == "causal" and "lm_head.weight" in info["missing_keys"]:  # else a random one
        fail(f"model {path} has no lm_head.weight in its weights (untied in its config.json?)")
    heads = sorted(k for k in info["unexpected_keys"] if "head" in k and "lm_head" not in k)
    if kind == "reward" and "score.weight" in info["missing_keys"]:
        found = f" (found {', '.join(heads)}: rename it to score.weight)" if heads else ""
        fail(f"reward model {path} has no scalar head score.weight in its weights{found}")
    rows = model.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) > rows:
        fail(f"model {path}: its tokenizer has {len(tokenizer)} tokens, its embeddings {rows} rows")
    if model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos if isinstance(eos, int) else 0
    return model


def load_scorers(ref_path, rm_path, bf16=False, with_ref=True):
    """Tokenizer, frozen reference (with_ref) and reward model (if rm_path), of one tokenizer."""
    tokenizer = load_tokenizer(ref_path)
    if rm_path and load_tokenizer(rm_path).get_vocab() != tokenizer.get_vocab():
        fail(f"the reward model {rm_path} and the model {ref_path} use different tokenizers")
    frozen = functools.partial(load_model, bf16=bf16, tokenizer=tokenizer)
    ref = frozen(ref_path, "causal").eval().requires_grad_(False) if with_ref else None
    rm = frozen(rm_path, "reward").eval().requires_grad_(False) if rm_path else None
    return tokenizer, ref, rm


def forward(model, input_ids, attention_mask, **kwargs):
    """A forward, position ids from the mask (left- and right-padded rows agree), no KV cache."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return model(**inputs, use_cache=False, **kwargs)


def unwrap(model):
    """The model inside a DDP / accelerate wrapper."""
    return getattr(model, "module", model)


def trainable(model, args, kind):
    """Gradient checkpointing and LoRA (peft) if asked; peft's SEQ_CLS trains the `score` head."""
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        task = "CAUSAL_LM" if kind == "causal" else "SEQ_CLS"
        sizes = dict(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=args.lora_targets)
        config = LoraConfig(**sizes, task_type=task)
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # e.g. target modules the model does not have
            fail(f"--lora-targets {args.lora_targets}: {first_line(e)}")
        for p in model.parameters():  # base weights stay frozen (bf16); what trains is fp32
            p.data = p.data.float() if p.requires_grad else p.data
    return model


def make_optimizer(model, args, total_steps):
    """AdamW, the paper's betas (0.9, 0.95); linear warm-up, cosine decay to --min-lr-ratio x lr."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup, floor = math.ceil(args.warmup_ratio * total_steps), {"min_lr_rate": args.min_lr_ratio}
    scheduler = get_scheduler(
        "cosine_with_min_lr", optimizer, warmup, total_steps, scheduler_specific_kwargs=floor
    )
    return optimizer, scheduler


def save_model(accelerator, model, tokenizer, output_dir):
    """save_pretrained (what the Auto classes load) into model.tmp, then moved in: never half."""
    state_dict = accelerator.get_state_dict(model)  # every process: FSDP gathers its shards here
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        if hasattr(model, "merge_and_unload"):  # LoRA: merge the adapters into plain weights
            model, state_dict = model.merge_and_unload(), None
        tmp = os.path.join(output_dir, "model.tmp")
        try:
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Runs, by four mechanisms (docs/robustness.md): one rule for every path written (output_path),
# every file written atomically (atomic), a run is finished or it is not (start_run, finish_run:
# result.json), and one error boundary (main).

RUN = {}  # the run this process writes: its directories, lock, and whether it made the directory
# Ctrl-C, `timeout` and schedulers (SIGTERM; SLURM's --signal: SIGUSR1/2; a CPU limit: SIGXCPU), a
# closed terminal (SIGHUP), Ctrl-\ (SIGQUIT): each one line and a clean-up, not a silent death.
CAUGHT = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1}
CAUGHT |= {signal.SIGUSR2, signal.SIGXCPU}


def make_accelerator(args):
    if args.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        fail("--bf16: this GPU has no bf16 support; drop --bf16")
    # --batch-size is global (split_batches). The data order is a function of (seed, epoch), so a
    # resumed run sees the same batches. cpu=True without a GPU lets torchrun run DDP over gloo.
    data = dict(split_batches=True, use_seedable_sampler=True, data_seed=args.seed)
    sizes = dict(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    precision, config = "bf16" if args.bf16 else "no", DataLoaderConfiguration(**data)
    accelerator = Accelerator(mixed_precision=precision, dataloader_config=config, **sizes)
    set_seed(args.seed)
    return accelerator


def cache_home():
    home = os.path.join(os.path.expanduser("~"), ".cache", "segment_rlhf")
    return os.path.realpath(os.path.expanduser(os.environ.get("SEGMENT_RLHF_CACHE") or home))


def cache_dir(kind, inputs=()):
    """$SEGMENT_RLHF_CACHE/kind (default ~/.cache/segment_rlhf/kind), made after the written-path
    rule: caches never go into a model folder, which push_to_hub would upload whole."""
    path = os.path.join(cache_home(), kind)
    path = output_path(path, inputs, "the cache ($SEGMENT_RLHF_CACHE)", kind="folder")
    os.makedirs(path, exist_ok=True)
    return path


def stamp(path):
    """What an input's content is known by: a file's hash; for a folder (a model, a dataset), the
    names and hashes of its files (a copy is the same input; a retrained model, or one with a few
    layers merged from LoRA, another); a hub id is itself."""
    if not path or not os.path.exists(path):
        return path
    if os.path.isfile(path):
        return file_hash(path, *stat_key(path))
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names)
    names = [f"{os.path.relpath(f, path)} {file_hash(f, *stat_key(f))}" for f in files]
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def stat_key(file):
    """What any write to a file changes: its inode, size and times (ctime cannot be set back)."""
    st = os.stat(file)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@functools.cache  # read once per process while a file stays as it is (16 GB: some tens of s)
def file_hash(file, *key):
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def output_path(path, inputs, flag, kind="file"):
    """The one rule for every path a command writes: resolved (symlinks, '..', a trailing '/')
    before anything is built from it, never an input nor inside or around one, and of its kind:
    a file in an existing, writable folder, or a folder."""
    real = os.path.realpath(path)
    if kind == "folder" and os.path.exists(real) and not os.path.isdir(real):
        fail(f"{flag} {path} is a file; pass a directory")
    # a device or a pipe too: the rename of atomic() would put a plain file in its place
    plain = not os.path.exists(real) or os.path.isfile(real)
    if kind == "file" and not (plain and os.access(os.path.dirname(real), os.W_OK)):
        fail(f"{flag} {path} cannot be written: not a plain file, or no writable folder")
    for p in filter(os.path.exists, filter(None, inputs)):
        if os.path.commonpath([real, os.path.realpath(p)]) in (real, os.path.realpath(p)):
            fail(f"{flag} {path} would overwrite the input {p}; pass another one")
    return real


def start_run(args, command, accelerator, inputs, in_place=False):
    """Claim --output-dir, everything checked before anything is written. A new or resumed run
    writes OUT itself, else OUT.incomplete, which takes OUT's place when done (finish_run). OUT
    holding this very run, finished: its result, nothing else. in_place: fit-norm's own folder."""
    final = output_path(args.output_dir, [] if in_place else inputs, "--output-dir", "folder")
    staged, aside = final + ".incomplete", final + ".replaced"
    for path in (staged, aside):  # what a run writes beside OUT, by the same rule
        output_path(path, [] if in_place else inputs, "--output-dir", kind="")
    skip = ("overwrite", "resume", "save_every")  # a run is the same run whatever these say
    flags = [f.name for f in dataclasses.fields(args) if f.init and f.name not in skip]
    record = {"command": command, **{name: getattr(args, name) for name in flags}}
    real = lambda p: os.path.realpath(p) if p and os.path.exists(p) else p  # noqa: E731
    for key in {"model", "dataset", "reward_model"} & set(record):  # one spelling, as for OUT
        record[key] = real(record[key])
    record.update(output_dir=final, inputs={real(p): stamp(p) for p in inputs if p})
    record = plain(record)  # as args.json holds it
    work = staged if args.resume and os.path.isfile(os.path.join(staged, "args.json")) else final
    mode = "in place" if in_place else run_mode(work, record, args)
    if mode == "finished":
        say(f"{final} holds this run, finished; pass --overwrite to run it again")
        return read_json(os.path.join(final, "result.json"), "run result")
    if mode == "replace" and work == final:
        run_mode(staged, record, args)  # an abandoned earlier attempt may be cleared, no more
        if os.path.exists(aside) and not os.path.isfile(os.path.join(aside, "args.json")):
            fail(f"{aside} is in the way (not written by segment_rlhf.py); move it")
        work = staged
    # Every process has judged the directory as it was: only now may the main process change it
    # (else a process that looks later finds the new args.json and takes the run for a replacement).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        lock = FileLock(lock_path(final, inputs), timeout=0)  # released by the system at a death
        try:
            lock.acquire()
        except Timeout:
            fail(f"{final} is in use by another run; wait for it to finish")
        RUN["lock"] = lock
    RUN.update(given=args.output_dir, final=final, work=work, created=False, in_place=in_place)
    RUN["resumable"] = command in ("train-rm", "ppo")
    if accelerator.is_main_process and not in_place:
        if mode == "replace" or not os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            RUN["created"] = True
        write_json(os.path.join(work, "args.json"), record)
        if not (args.resume and checkpoints(work)):  # no stale rows from an earlier attempt
            with atomic(os.path.join(work, "metrics.jsonl")) as tmp:  # a new file: a hard-linked
                open(tmp, "w").close()  # backup of the run (cp -al) keeps its rows
    accelerator.wait_for_everyone()
    args.output_dir = work


def run_mode(path, record, args):
    """'new' (absent or empty), 'resume', 'replace' or 'finished' for the run `record` in
    `path`; fails for a directory that must be left as it is."""
    if os.path.isfile(path):
        fail(f"--output-dir {path} is a file; pass a directory")
    if not os.path.isdir(path) or not os.listdir(path):
        return "new"
    if not os.path.isfile(os.path.join(path, "args.json")):
        fail(f"{path} is not empty, was not written by segment_rlhf.py: pass another --output-dir")
    old = plain(read_json(os.path.join(path, "args.json"), "run settings"))  # a bare Infinity too
    if old != record and args.resume:
        keys = [k for k in {**record, **old} if k != "inputs" and old.get(k) != record.get(k)]
        flags = [f"--{k.replace('_', '-')} {record.get(k)} (was {old.get(k)})" for k in keys]
        was, now = old.get("inputs", {}), record["inputs"]
        flags += [f"{p} changed" for p in {**was, **now} if was.get(p) != now.get(p)]
        fail(f"--resume: {path} differs: {', '.join(flags)}; rerun with its flags and inputs")
    if old != record and not args.overwrite:
        fail(f"{path} holds a different run; pass --overwrite or another --output-dir")
    if old == record and os.path.isfile(os.path.join(path, "result.json")) and not args.overwrite:
        return "finished"
    if checkpoints(path) and not args.overwrite and not args.resume:
        fail(f"{path} holds checkpoints; pass --resume to continue, or --overwrite to start again")
    return "resume" if args.resume else "replace"


def finish_run(args, accelerator, result):
    """The run is complete: its result is saved, a staged run takes the old one's place (renamed
    aside, then removed), and the lock is released. Returns the result."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not RUN["in_place"]:
        write_json(os.path.join(RUN["work"], "result.json"), result)
        if RUN["work"] != RUN["final"]:
            aside = RUN["final"] + ".replaced"
            shutil.rmtree(aside, ignore_errors=True)
            # A signal between the two renames waits (noted, then raised): OUT holds the old run
            # or the new one, never none. (A blocked mask would not do: another thread takes it.)
            got = []
            handlers = {s: signal.signal(s, lambda n, f: got.append(n)) for s in CAUGHT}
            try:
                if os.path.isdir(RUN["final"]):
                    os.replace(RUN["final"], aside)
                os.replace(RUN["work"], RUN["final"])
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
            if got and callable(handlers[got[0]]):
                handlers[got[0]](got[0], None)
            shutil.rmtree(aside, ignore_errors=True)
    accelerator.wait_for_everyone()
    args.output_dir, RUN["created"] = RUN["given"], False
    close_run()
    return plain(result)  # as result.json holds it


def close_run():
    """After any run: a directory it created goes (unless a checkpoint can resume it); unlocked."""
    if RUN.get("created") and not checkpoints(RUN["work"]):
        shutil.rmtree(RUN["work"], ignore_errors=True)
    if "lock" in RUN:
        RUN["lock"].release()
    RUN.clear()


def lock_path(final, inputs=()):
    """The lock of a run directory: in the cache, named after the resolved directory, so it is
    the same for every spelling of it and never a file of the user's (a uv.lock beside uv/)."""
    name = hashlib.sha1(final.encode()).hexdigest() + ".lock"
    return os.path.join(cache_dir("locks", inputs), name)


def read_json(path, what):
    """A JSON file the user may have edited or truncated: read, or one line saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"could not read the {what} {path}: {e}")
    return value if isinstance(value, dict) else fail(f"the {what} {path} must hold a JSON object")


@contextlib.contextmanager
def atomic(path):
    """Yields a temporary name beside `path`, renamed to `path` when the block succeeds: a
    failure at any byte (a full disk, a kill) leaves the old file or folder, or none."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)


def plain(value):
    """JSON has no infinity (RFC 8259: jq and the Hub's parser refuse a bare Infinity), so what
    this file writes names a non-finite number instead: a bandit's c = inf is "inf"."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path, value):
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(plain(value), f, indent=1)


def log_metrics(args, accelerator, row):
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(plain(row)) + "\n")


def checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, oldest first (a `.tmp` one was never finished)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted(int(d.split("-")[1]) for d in names if re.fullmatch(r"checkpoint-\d+", d))
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def save_checkpoint(accelerator, args, state):
    """accelerate's save_state (models, optimizers, RNG) plus `state`, into checkpoint-N.tmp, then
    renamed; the older ones deleted after (accelerate's total_limit deletes them before)."""
    path = os.path.join(args.output_dir, f"checkpoint-{state['step']}")
    try:
        accelerator.save_state(path + ".tmp")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
                state["metrics_rows"] = sum(1 for _ in f)
            write_json(os.path.join(path + ".tmp", "state.json"), state)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(path + ".tmp", path)
    except BaseException as e:  # a full disk, Ctrl-C: no half checkpoint stays to fill the disk
        full = isinstance(e, Exception) and shutil.disk_usage(args.output_dir).free < 2**20
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        if full:  # said now: once the half checkpoint is gone, the disk no longer looks full
            fail(f"no space left on the device for {path}")
        raise
    if accelerator.is_main_process:
        for old in checkpoints(args.output_dir)[:-1]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, args, fresh):
    """--resume: restore the newest checkpoint, its state of the keys and types of `fresh` (the
    state at the start), and drop the metrics rows logged after it."""
    path = (checkpoints(args.output_dir) or [None])[-1]
    if path is None:
        say(f"--resume: no checkpoint in {args.output_dir}, starting from the beginning")
        return None
    state = read_json(os.path.join(path, "state.json"), "checkpoint state")
    try:
        shaped = all(type(state.get(k)) is type(v) for k, v in fresh.items())
        if not shaped or path != os.path.join(args.output_dir, f"checkpoint-{state['step']}"):
            raise ValueError(f"its state.json does not hold {', '.join(fresh)} as written")
        rows = int(state["metrics_rows"])
        accelerator.load_state(path)
    except (KeyError, TypeError, OSError, RuntimeError, ValueError, SafetensorError) as e:
        fail(f"checkpoint {path} is damaged ({first_line(e)}); remove it to resume from none")
    if accelerator.is_main_process:
        metrics = os.path.join(args.output_dir, "metrics.jsonl")
        with open(metrics) as f, atomic(metrics) as tmp, open(tmp, "w") as out:
            out.writelines(f.readlines()[:rows])
    say(f"resumed from {path}")
    return state


def check_finite(accelerator, value, what, step):
    """Stop before a non-finite loss or reward reaches the weights (one host sync a step)."""
    if not torch.isfinite(accelerator.reduce(value.detach().float().sum(), "sum")):
        fail(f"non-finite {what} at step {step}")


# ----------------------------------------------------------------------------------------------
# Presets (their tables are under the configuration) and reward model settings.


def preset_defaults(name, command):
    """Flag defaults for `command` under preset `name`. A preset's train-rm writes its reward model
    to runs/<preset>-segment-rm; its ppo uses the released one (--reward-model names another)."""
    if name == "look":
        return TOY_LOOK.get(command, {})
    if name not in PAPER_MODELS:
        fail(f"unknown --preset {name!r}; choose from look, {', '.join(PAPER_MODELS)}")
    m, trained = PAPER_MODELS[name], f"runs/{name}-segment-rm"
    common = {"model": m["model"], "end_token": m["end_token"]}
    if command == "train-rm":
        sizes = {**m.get("rm_sizes", {}), "entropy_threshold": m["c"], "output_dir": trained}
        return {**PAPER_RM, **PAPER_BOTH, **common, **sizes}
    if command == "ppo":
        rm = m["rm"].format("segment") if m["rm"] else trained
        sizes = {**m.get("ppo_sizes", {}), "episodes": m["episodes"], "reward_model": rm}
        return {**PAPER_PPO, **PAPER_BOTH, **common, **sizes, "output_dir": f"runs/{name}-ppo"}
    return common


def released_rm_settings(path):
    """Settings of the authors' released reward models, which ship without ours: by hub id, or a
    local copy (a folder named after it, or its snapshot in huggingface_hub's cache)."""
    local, name = os.path.isdir(path), os.path.basename(os.path.normpath(path))
    for m in (m for m in PAPER_MODELS.values() if m["rm"]):
        for kind, c in (("segment", m["c"]), ("token", 0.0), ("bandit", math.inf)):
            repo = m["rm"].format(kind)
            cached = try_to_load_from_cache(repo, "config.json") if local else None
            snapshot = isinstance(cached, str) and os.path.samefile(os.path.dirname(cached), path)
            if path == repo or local and name == repo.split("/")[1] or snapshot:
                settings = dict(zip(("mean", "std"), m["bandit"]), entropy_threshold=c)
                settings.update(reference_model=m["model"], end_token=m["end_token"])
                return settings if kind == "bandit" else {**settings, "normalizer": list(m[kind])}
    return None


def load_rm_settings(path):
    """Segmentation settings and normalizer of a reward model, checked once, here: `segment_rlhf`
    in its config.json or the released models' table; OpenRLHF's mean / std there win."""
    file = os.path.join(path, "config.json")
    config = read_json(file, "model config") if os.path.isfile(file) else {}
    if "segment_rlhf" not in config:
        why = "has no segment_rlhf settings in its config.json: train it with train-rm, or --preset"
        why = why if os.path.isdir(path) or is_hub_id(path) else "is not a folder"
        stored = released_rm_settings(path) or fail(f"reward model {path!r} {why}")
    elif not isinstance(stored := config["segment_rlhf"], dict):
        fail(f"{file}: segment_rlhf must hold the settings object; retrain with train-rm")
    needed = ("entropy_threshold", "reference_model", "end_token")
    if missing := [k for k in needed if k not in stored]:
        fail(f"{file} lacks {', '.join(missing)}; retrain with train-rm or restore the file")
    s = {**stored, **{k: config[k] for k in ("mean", "std") if k in config}}
    if s["entropy_threshold"] == "inf":  # the bandit's c, as plain() writes it
        s["entropy_threshold"] = math.inf
    # One check of every value PPO reads: a wrong one would run and give a wrong result.
    c, norm = s["entropy_threshold"], s.get("normalizer")
    numbers = [c, *(norm or []), *(s[k] for k in ("mean", "std", "min_position") if k in s)]
    texts = [s.get(k, "") for k in ("reference_model", "end_token", "reference_model_was")]
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers)
    ok = ok and all(math.isfinite(v) for v in numbers[1:]) and c >= 0 and s.get("std", 1) > 0
    ok = ok and 0 < s.get("min_position", 1) <= 1 and all(isinstance(t, str) for t in texts)
    ok = ok and (norm is None or isinstance(norm, list) and len(norm) == 4 and norm[3] > 0)
    ok = ok and s.get("toy_lists", 1) in range(1, 9) and not isinstance(s.get("toy_lists"), bool)
    if not ok:
        fail(f"{file}: the settings hold non-finite or malformed values; refit with fit-norm")
    if (ref := s["reference_model"]).startswith("."):  # relative to the RM (write_rm_settings)
        ref = os.path.abspath(os.path.join(os.path.realpath(path), ref))  # a symlink's target
        s["reference_model"] = ref if os.path.isdir(ref) else s.get("reference_model_was", ref)
    return s


def write_rm_settings(rm_dir, settings, backup=False):
    """Into config.json, their one home: `segment_rlhf`, mean / std at the top level (OpenRLHF's);
    a local reference model relative to the reward model, and absolute (a copied RM alone)."""
    settings = dict(settings)
    mean, std = settings.pop("mean"), settings.pop("std")
    ref = settings["reference_model"]
    if os.path.isdir(ref):
        settings["reference_model_was"] = os.path.abspath(ref)
        settings["reference_model"] = os.path.relpath(os.path.abspath(ref), os.path.abspath(rm_dir))
    file = os.path.join(rm_dir, "config.json")
    config = read_json(file, "model config")
    with atomic(file) as tmp:  # the new file whole first: a full disk leaves both as they were
        with open(tmp, "w") as f:
            config.update(plain(dict(segment_rlhf=settings, mean=mean, std=std)))  # ours alone
            json.dump(config, f, indent=1)
        if backup:
            with atomic(file + ".bak") as bak:
                shutil.copy2(file, bak)


def check_fits(args, settings):
    """A reward model scores answers like those it was trained on: closed by its end token, and
    on the toy, of as many lists."""
    lists = getattr(args, "toy_lists", None)  # segment has none: it shows the reward model's
    trained = settings.get("toy_lists", lists)
    if lists and not args.dataset and trained != lists:
        again = f"pass another --reward-model or --toy-lists {trained}"
        fail(f"{args.reward_model} answers the toy's --toy-lists {trained}, not {lists}: {again}")
    if args.end_token and args.end_token != settings.get("end_token", args.end_token):
        was = f"{args.reward_model} was trained on answers closed by {settings['end_token']!r}"
        fail(f"--end-token {args.end_token!r}: {was}; drop --end-token")


def reference_model(args, settings):
    """--model, else the reward model's reference model, which must be where it was and as it was:
    its entropies cut the segments the reward model learned on."""
    path = args.model or settings["reference_model"]
    if not args.model and os.path.isabs(path) and not os.path.isdir(path):
        fail(f"the reference model {path} of reward model {args.reward_model} moved; pass --model")
    if not args.model and settings.get("reference_stamp") not in (None, stamp(path)):
        why = f"was changed since {args.reward_model} was trained on it"
        fail(f"the reference model {path} {why}: retrain the reward model, or pass --model {path}")
    return path


def has_settings(path):
    file = os.path.join(path, "config.json")
    return os.path.isfile(file) and "segment_rlhf" in read_json(file, "model config")


def planned_rm_settings(args):
    """The reward model's settings; for one not trained yet (the toy's, or the one a preset's
    train-rm writes), those it will be trained with."""
    path, preset = args.reward_model, args.preset
    if has_settings(path):
        return load_rm_settings(path)
    if path in (TOY_RM, LOOK_RM):
        planned = {"entropy_threshold": RMArgs.entropy_threshold, "toy_lists": 1}
        return {**planned, "normalizer": "fitted by train-rm"}
    if preset and path == preset_defaults(preset, "train-rm")["output_dir"]:
        c = PAPER_MODELS[preset]["c"]
        return {"entropy_threshold": c, "normalizer": f"fitted by train-rm --preset {preset}"}
    return load_rm_settings(path)


def resolve_reward(args, settings):
    """Reward mode (the reward model's cutoff's unless given), value clip, the preset's tweaks."""
    check_fits(args, settings)
    c = settings["entropy_threshold"]
    trained = "bandit" if math.isinf(c) else "token" if c == 0 else "segment"
    args.reward_mode = args.reward_mode or trained
    # Each mode's normalizer belongs to its cutoff: a segment one applied per token is wrong.
    if args.reward_mode != trained:
        fail(f"--reward-mode {args.reward_mode} does not fit a reward model trained at c = {c}")
    if args.location_norm and "normalizer" not in settings and args.reward_mode != "bandit":
        fail(f"{args.reward_model} has no fitted normalizer: run fit-norm, or --no-location-norm")
    if args.value_clip is None:
        args.value_clip = 0.2 if args.reward_mode == "bandit" else 0.25  # the paper's values
    recipe = PAPER_MODELS.get(args.preset, {"recipe": {}})["recipe"].get(args.reward_mode, {})
    if args.length_norm is None:
        args.length_norm = recipe.get("length_norm", False)
    if args.end_penalty is None:
        args.end_penalty = recipe.get("end_penalty")


# ----------------------------------------------------------------------------------------------
# Command line: one subcommand per stage, its flags from the dataclasses (HfArgumentParser, as
# TRL's scripts do), resolved and checked once before anything runs; one error boundary.

COMMANDS = {  # name: its flags, what runs it, what it does
    "sft": (SFTArgs, sft, "toy only: fine-tune the toy model, the stage before train-rm"),
    "train-rm": (RMArgs, train_rm, "train a segment reward model; fit its normalizer"),
    "fit-norm": (FitNormArgs, fit_norm, "refit the normalizer of a trained reward model"),
    "ppo": (PPOArgs, ppo, "PPO of the SFT policy against dense segment rewards"),
    "segment": (SegmentArgs, segment, "show a response cut into its segments, with rewards"),
}


class Parser(HfArgumentParser):
    def error(self, message):  # one line instead of the usage block; --help has the rest
        fail(f"{message} (see {self.prog} --help)")


def parse_args(argv=None):
    parser = Parser(prog="segment_rlhf.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    subparsers = {}
    for name, (cls, _, text) in COMMANDS.items():
        subparsers[name] = sub.add_parser(name, dataclass_types=cls, help=text, description=text)
        for f in dataclasses.fields(cls):  # --no-X for every switch that is off by default
            if f.init and f.type in (bool, bool | None) and f.default is not True:
                flag = "--no-" + f.name.replace("_", "-")
                subparsers[name].add_argument(flag, dest=f.name, action="store_false", help="")
    ns = parser.parse_args(argv)
    if getattr(ns, "preset", ""):  # a preset changes the defaults; explicit flags still win
        subparsers[ns.command].set_defaults(**preset_defaults(ns.preset, ns.command))
        ns = parser.parse_args(argv)
    cls = COMMANDS[ns.command][0]
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init}
    return ns.command, cls(**values)


def resolve(command, args):
    """Derived settings and their checks, once, after parsing: number ranges, output directory,
    rows per process per forward; for ppo the reward model, its mode and the value clip."""
    for bounds, names in BOUNDS.items():
        lo, hi = (float(x) for x in bounds[1:-1].split(", "))
        for name in names.split():
            v = getattr(args, name, None)
            above = v is None or lo < v or bounds[0] == "[" and v == lo  # NaN is neither
            if not (above and (v is None or v < hi or bounds[-1] == "]" and v == hi)):
                fail(f"--{name.replace('_', '-')} must be in {bounds}, got {v}")
    if command == "segment":
        return args
    if args.max_prompt_len >= args.max_len:
        fail(f"--max-prompt-len ({args.max_prompt_len}) must be below --max-len ({args.max_len})")
    if command == "ppo" and args.max_prompt_len + args.max_new_tokens > args.max_len:
        sizes = f"({args.max_prompt_len} + {args.max_new_tokens} > {args.max_len})"
        fail(f"--max-prompt-len + --max-new-tokens must not exceed --max-len {sizes}")
    if command in ("sft", "fit-norm") and (args.save_every or args.resume):  # quick, or in place
        fail(f"{command} has no checkpoints: --save-every and --resume are for train-rm and ppo")
    if args.resume and args.overwrite:
        fail("--resume continues a run and --overwrite starts it again: pass one of them")
    # runs/toy-* are the one-list toy's: a longer one (--toy-lists) names its own runs and SFT
    toy_default = not args.output_dir or command == "train-rm" and not args.model
    need = "--output-dir and --model" if command == "train-rm" else "--output-dir"
    if args.toy_lists > 1 and not args.dataset and command != "fit-norm" and toy_default:
        fail(f"--toy-lists {args.toy_lists}: runs/toy-* answer one list; pass {need}")
    if command == "fit-norm":  # in place unless --output-dir
        args.output_dir = args.output_dir or args.reward_model
    args.output_dir = args.output_dir or f"runs/toy-{'rm' if command == 'train-rm' else command}"
    out, cache = os.path.realpath(args.output_dir), cache_home()
    if os.path.commonpath([out, cache]) == out:  # a replaced run would take it along
        fail(f"$SEGMENT_RLHF_CACHE {cache} lies inside --output-dir {out}: move one of them")
    for name, least in (("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):  # torchrun's, accelerate's
        value = os.environ.get(name, str(least))
        if not re.fullmatch(r"[0-9]+", value) or int(value) < least:
            fail(f"{name}={value!r} in the environment must be a whole number >= {least}")
    world = os.environ.get("WORLD_SIZE", "1")
    per_step = args.grad_accum * int(world)
    split = f"--grad-accum x processes ({args.grad_accum} x {world})"
    if args.batch_size % per_step:
        fail(f"--batch-size {args.batch_size} must be a multiple of {split}")
    args.micro_batch = args.batch_size // per_step
    if command == "ppo":
        if args.mini_batch_size % per_step or args.batch_size % args.mini_batch_size:
            fail(f"--mini-batch-size must divide --batch-size and be a multiple of {split}")
        args.micro_batch = args.mini_batch_size // per_step
        if not args.reward_model and args.model:
            fail("--reward-model is required with --model")
        args.reward_model = args.reward_model or TOY_RM
        resolve_reward(args, planned_rm_settings(args))
    return args


def first_line(e):
    """An exception as one line: an OS error's reason and file, else the first line it says."""
    if isinstance(e, OSError) and e.strerror:  # a copy or a rename names both of its files
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{e.strerror}: {files}" if files else e.strerror
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def interrupt(signum, frame):
    """The signals of CAUGHT are handled like Ctrl-C: one line, cleaned up. One the process was
    started ignoring stays ignored (nohup's SIGHUP: the run outlives its terminal)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None):
    command, caught = None, CAUGHT - {signal.SIGINT}  # Ctrl-C raises KeyboardInterrupt itself
    caught = {s for s in caught if signal.getsignal(s) != signal.SIG_IGN}  # nohup's SIGHUP stays
    previous = {sig: signal.signal(sig, interrupt) for sig in caught}
    # transformers reports a fresh scalar head as MISSING, which reads like an error (load_model
    # checks the loading info itself); and, so quieted, which layers were "not sharded" on one GPU.
    for name in ("modeling_utils", "distributed.tensor_parallel"):
        transformers_logging.get_logger(f"transformers.{name}").setLevel("ERROR")
    try:
        command, args = parse_args(argv)
        args = resolve(command, args)
        if getattr(args, "dry_run", False):
            resolved = {"command": command, **dataclasses.asdict(args)}
            if command == "ppo":
                resolved["reward_model_settings"] = planned_rm_settings(args)
            if getattr(args, "episodes", 0):  # --steps follow from the prompts, not loaded yet
                resolved["steps"] = f"--episodes {args.episodes} x prompts / --batch-size"
            print(json.dumps(plain(resolved), indent=1))
            return resolved
        run = COMMANDS[command][1]
        if command == "ppo" and args.reward_model in (TOY_RM, LOOK_RM) and not args.dataset:
            from benchmarks.extras import quick_start  # the toy run between a plan and a summary

            look = args.reward_model == LOOK_RM
            run = functools.partial(quick_start, ppo, sft_dir=LOOK_SFT if look else TOY_SFT)
        try:
            result = run(args)
        except BaseException as e:
            for bar in list(tqdm._instances):  # closed now, not printed after the error line
                bar.close()
            # A Ctrl-C inside a torch context manager comes out as RuntimeError("trying to pop
            # from empty mode stack"), the interrupt as its context: that interrupt is raised.
            cause = e
            for _ in range(100):  # (a chain of causes can loop back on itself)
                if cause is None or isinstance(cause, KeyboardInterrupt):
                    break
                cause = cause.__cause__ or cause.__context__
            raise cause if isinstance(cause, KeyboardInterrupt) else e
        print(json.dumps(plain(result)), flush=True)
    except BrokenPipeError:  # stdout closed early (`| head`, the segment view or the closing
        # line): quiet, as other tools are; nothing else here writes to a pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        raise SystemExit(128 + signal.SIGPIPE) from None
    except KeyboardInterrupt as e:  # 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM
        how = f" by {e.args[0]}" if e.args else ""
        hint = "; resume with --resume" if command in ("train-rm", "ppo") else ""
        say(f"segment_rlhf: error: interrupted{how}{hint}")
        raise SystemExit(128 + (signal.Signals[e.args[0]] if e.args else signal.SIGINT)) from None
    except SystemExit as e:  # a fail() line: say where a failed run stands
        raise SystemExit(e.code + where_it_stands()) if isinstance(e.code, str) else e from None
    except (OSError, RuntimeError, ValueError, ImportError, SafetensorError, TemplateError) as e:
        if os.environ.get("SEGMENT_RLHF_DEBUG", "0").lower() in ("1", "true", "yes"):
            raise
        what = "the chat template raised: " if isinstance(e, TemplateError) else ""
        how = "" if isinstance(e, OSError) else " (SEGMENT_RLHF_DEBUG=1 shows the traceback)"
        line = f"segment_rlhf: error: {what}{first_line(e)}{how}{where_it_stands()}"
        raise SystemExit(line) from None
    finally:
        close_run()  # a run that did not finish leaves no directory it created
        for sig in caught:
            signal.signal(sig, previous[sig])
    return result


def where_it_stands():
    """The end of a failed run's error line: a full disk, and its newest complete checkpoint."""
    if not RUN.get("resumable"):
        return ""
    where = RUN["work"]
    while not os.path.exists(where):  # a run that could not make its directory
        where = os.path.dirname(where)
    full = "; the disk is full" if shutil.disk_usage(where).free < 2**20 else ""
    none = "none (pass --save-every N to keep some)"
    return f"{full}; last good checkpoint: {(checkpoints(RUN['work']) or [none])[-1]}"


if __name__ == "__main__":
    main()
