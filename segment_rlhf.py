"""Segment-level RLHF in one file.

Yin et al., 2025, "Segmenting Text and Learning Their Rewards for Improved RLHF in Language Model"
(arXiv 2501.02790). The reward model scores *segments* instead of whole responses or single tokens:
a segment ends wherever the reference LM is unsure what comes next (next-token entropy > c), the
model's per-token head read at a segment's last token is that segment's reward, and a sequence
scores the mean of its segment rewards (trained with Bradley-Terry). PPO then normalizes each
segment reward with a mean and std that depend on where the segment sits in the response, spreads
it evenly over the segment's tokens, and optimizes against those dense rewards.

Pipeline:  sft (toy only) -> train-rm -> ppo;  `segment` shows what the method sees.

    python segment_rlhf.py ppo                       # toy task, CPU, builds sft + reward model first
    python segment_rlhf.py segment --reward-model runs/toy-rm
    python segment_rlhf.py train-rm --preset phi3-mini --bf16 --gradient-checkpointing
    accelerate launch --num_processes 8 segment_rlhf.py ppo --preset phi3-mini --bf16
"""
import argparse
import dataclasses
import html
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

SETTINGS_FILE = "segment_rlhf.json"  # segmentation settings + normalizer, saved beside a reward model


def fail(msg):
    """Bad input: one clear line and a non-zero exit, never a traceback."""
    raise SystemExit(f"segment_rlhf: error: {msg}")


# ----------------------------------------------------------------------------------------------
# Configuration: one dataclass per subcommand; the defaults are the embedded toy run.


@dataclass
class Common:
    model: str = field(default="", metadata={"help": "SFT / reference model (hub id or directory); empty: the toy SFT model"})
    dataset: str = field(default="", metadata={"help": "hub id or local json/jsonl/parquet file; empty: the toy task"})
    output_dir: str = field(default="", metadata={"help": "where everything is written (default: runs/toy-<subcommand>)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    max_len: int = field(default=64, metadata={"help": "max tokens of prompt + response"})
    max_prompt_len: int = field(default=32, metadata={"help": "prompts longer than this are cut from the left"})
    end_token: str = field(default="", metadata={"help": "token closing a response (default: the tokenizer's eos)"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    batch_size: int = field(default=32, metadata={"help": "global batch size (pairs for train-rm, prompts for ppo)"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps per optimizer step"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "linear warm-up, as a fraction of all steps"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision"})
    overwrite: bool = field(default=False, metadata={"help": "allow writing into an existing run directory"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward: less memory, ~30%% more time"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank (peft) for the trained models; 0: full fine-tuning"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator"})
    lora_targets: str = field(default="all-linear", metadata={"help": "modules that get adapters (peft target_modules)"})
    preset: str = field(default="", metadata={"help": "the paper's settings: phi3-mini | llama3-sft-8b | llama31-instruct-8b; flags override"})
    dry_run: bool = field(default=False, metadata={"help": "print the resolved configuration and exit"})
    save_every: int = field(default=0, metadata={"help": "train-rm, ppo: save a resumable checkpoint every N optimizer steps (ppo: iterations); 0: never"})
    resume: bool = field(default=False, metadata={"help": "train-rm, ppo: continue from the latest checkpoint in --output-dir"})


@dataclass
class SFTArgs(Common):
    epochs: int = field(default=6, metadata={"help": "passes over the SFT data"})
    flawed_fraction: float = field(default=0.3, metadata={"help": "toy only: share of flawed SFT targets, so PPO has room to improve"})


@dataclass
class RMArgs(Common):
    entropy_threshold: float = field(default=1.0, metadata={"help": "entropy cutoff c: a number (segment), 0 (token), inf (bandit)"})
    epochs: int = field(default=5, metadata={"help": "passes over the preference data"})
    lr: float = field(default=3e-4, metadata={"help": "learning rate"})
    eval_size: int = field(default=200, metadata={"help": "pairs held out from the training data for evaluation"})
    norm_samples: int = field(default=0, metadata={"help": "training pairs scored to fit the normalizer; 0: all"})


@dataclass
class FitNormArgs(Common):
    reward_model: str = field(default="runs/toy-rm", metadata={"help": "reward model directory whose normalizer is (re)fitted"})
    norm_samples: int = field(default=0, metadata={"help": "preference pairs scored; 0: all (the authors used 60,000 responses)"})
    plot: str = field(default="", metadata={"help": "also draw per-position means / stds and the fitted curves to this PNG"})


@dataclass
class SegmentArgs:
    prompt: str = field(default="", metadata={"help": "user prompt (chat template applied)"})
    response: str = field(default="", metadata={"help": "response to segment"})
    text: str = field(default="", metadata={"help": "raw text to segment, no chat template"})
    dataset: str = field(default="", metadata={"help": "take the pair from this dataset's row --row (its chosen response)"})
    row: int = field(default=0, metadata={"help": "dataset row"})
    model: str = field(default="", metadata={"help": "reference model giving the entropies (default: the reward model's)"})
    reward_model: str = field(default="", metadata={"help": "reward model directory: adds segment rewards"})
    entropy_threshold: float = field(default=float("nan"), metadata={"help": "cutoff c (default: the reward model's, else 1.0)"})
    html: str = field(default="", metadata={"help": "also write the segments as an HTML page to this file"})
    end_token: str = field(default="", metadata={"help": "token closing a response (default: the tokenizer's eos)"})


TOY_SFT, TOY_RM, TOY_PPO = "runs/toy-sft", "runs/toy-rm", "runs/toy-ppo"

# The paper's runs (PAPER §2, §5): model, cutoff c, end token, released reward models, and the authors'
# fitted normalizers (a_mu, a_sigma, b_mu, b_sigma) for c and for c = 0, and the bandit (mean, std).
PAPER_MODELS = {
    "phi3-mini": dict(model="microsoft/Phi-3-mini-4k-instruct", c=1.75, end_token="<|end|>", episodes=2,
                      rm="yyqoni/Phi-3-mini-4k-instruct-{}-rm-700k", segment=(0.7668, 0.2569, 0.4705, 2.8339),
                      token=(0.9628, 0.3796, 1.2917, 3.5006), bandit=(-0.5195, 2.1563)),
    "llama3-sft-8b": dict(model="RLHFlow/LLaMA3-SFT-v2", c=2.0, end_token="<|eot_id|>", episodes=1,
                          rm="yyqoni/rlhflow-llama-3-sft-8b-v2-{}-rm-700k", segment=(0.8967, 0.5680, 0.8572, 4.1667),
                          token=(1.7340, 0.9906, 1.3212, 5.4513), bandit=(-0.8164, 2.9531)),
    "llama31-instruct-8b": dict(model="meta-llama/Llama-3.1-8B-Instruct", c=2.0, end_token="<|eot_id|>", episodes=1,
                                rm="yyqoni/meta-llama-3.1-instruct-8b-{}-rm-700k", segment=(0.8345, 0.4780, 0.8798, 3.7358),
                                token=(1.6268, 0.6254, 0.6419, 4.9217), bandit=(-0.8281, 2.9375)),
}
PAPER_RM = dict(dataset="hendrydong/preference_700K", lr=1e-6, epochs=1, batch_size=128, grad_accum=16, max_len=2048,
                max_prompt_len=1728, bf16=True, gradient_checkpointing=True, eval_size=1000, norm_samples=30000)
PAPER_PPO = dict(dataset="argilla/ultrafeedback-binarized-preferences-cleaned", lr=5e-7, critic_lr=9e-6, batch_size=1024,
                 mini_batch_size=128, grad_accum=16, ppo_epochs=1, max_prompt_len=1024, max_new_tokens=1024, max_len=2048,
                 beta=0.01, missing_eos_penalty=0.0, temperature=1.0, top_p=1.0, bf16=True, gradient_checkpointing=True)


def preset_defaults(name, command):
    """Flag defaults for `command` under preset `name`."""
    if name not in PAPER_MODELS:
        fail(f"unknown --preset {name!r}; choose from {', '.join(PAPER_MODELS)}")
    m = PAPER_MODELS[name]
    common = {"model": m["model"], "end_token": m["end_token"]}
    if command == "train-rm":
        return {**PAPER_RM, **common, "entropy_threshold": m["c"], "output_dir": f"runs/{name}-segment-rm"}
    if command == "ppo":
        return {**PAPER_PPO, **common, "episodes": m["episodes"], "reward_model": m["rm"].format("segment"),
                "output_dir": f"runs/{name}-segment-ppo"}
    return common


def released_rm_settings(path):
    """Settings of the authors' released reward models (they ship without our settings file)."""
    for m in PAPER_MODELS.values():
        for kind, c in (("segment", m["c"]), ("token", 0.0), ("bandit", float("inf"))):
            if path == m["rm"].format(kind):
                norm = {} if kind == "bandit" else {"normalizer": list(m[kind])}
                return {"entropy_threshold": c, "reference_model": m["model"], "end_token": m["end_token"],
                        "mean": m["bandit"][0], "std": m["bandit"][1], **norm}
    return None


# ----------------------------------------------------------------------------------------------
# The embedded toy task: "Name 4 fruits." -> "Here are 4 fruits: apple, plum, kiwi, fig."
# Quality is local to a segment: a flawed answer has one wrong item, a duplicate, or the wrong count.

CATEGORIES = {
    "fruits": ["apple", "plum", "kiwi", "fig", "pear", "mango", "lemon", "grape"],
    "colors": ["red", "blue", "green", "black", "white", "pink", "brown", "gray"],
    "animals": ["cat", "dog", "horse", "mouse", "tiger", "lion", "sheep", "goat"],
    "tools": ["hammer", "saw", "drill", "wrench", "chisel", "axe", "pliers", "rake"],
    "metals": ["iron", "gold", "silver", "tin", "lead", "zinc", "copper", "nickel"],
    "vegetables": ["carrot", "onion", "leek", "pea", "bean", "corn", "kale", "beet"],
}
TOY_COUNTS = (2, 3, 4, 5)
TOY_FLAWS = ("wrong", "duplicate", "count", "garbled", "stray")  # each decided inside one segment
TOY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def toy_prompt(rng):
    n, category = rng.choice(TOY_COUNTS), rng.choice(sorted(CATEGORIES))
    return f"Name {n} {category}.", n, category


def toy_response(rng, n, category, flaw=None):
    """A correct answer lists n distinct items of the category in alphabetical order (so a 1M model
    avoids repeats by looking at the previous item only); a flawed one has a 'wrong' item (another
    category's), a 'duplicate' item, a 'count' off by one, a 'garbled' item (random letters) or a 'stray'
    piece of the header in an item's place. The last two are there so that the reward model has seen text
    that is no item at all: PPO finds every kind of text the reward model never saw (README)."""
    k = n + (rng.choice((-1, 1)) if flaw == "count" else 0)
    items = sorted(rng.sample(CATEGORIES[category], k))
    if flaw == "wrong":
        other = rng.choice([c for c in CATEGORIES if c != category])
        items[rng.randrange(n)] = rng.choice(CATEGORIES[other])
    elif flaw == "duplicate":
        i = rng.randrange(1, n)
        items[i] = items[i - 1]
    elif flaw == "garbled":
        items[rng.randrange(n)] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
    elif flaw == "stray":
        items[rng.randrange(n)] = rng.choice([f"{n} {category}:", category, str(rng.choice(TOY_COUNTS))])
    return f"Here are {n} {category}: {', '.join(items)}."


def toy_score(prompt, response):
    """Exact quality in [0, 1]: distinct in-category items / max(asked, given); 0 if malformed."""
    ask = re.fullmatch(r"Name (\d+) (\w+)\.", prompt.strip())
    ans = re.fullmatch(r"Here are (\d+) (\w+): ([\w, ]+)\.", response.strip())
    if not ask or not ans or ans.group(1, 2) != ask.group(1, 2) or ask.group(2) not in CATEGORIES:
        return 0.0
    n, items = int(ask.group(1)), ans.group(3).split(", ")
    return min(len(set(items) & set(CATEGORIES[ask.group(2)])), n) / max(n, len(items))


def toy_preference_rows(n, seed=0):
    """Pairs (prompt, chosen, rejected): chosen is correct, rejected is the same answer with one flaw,
    so the preference is decided inside one segment."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        prompt, k, category = toy_prompt(rng)
        flaw, state = rng.choice(TOY_FLAWS), rng.getstate()
        chosen = toy_response(rng, k, category)
        rng.setstate(state)  # same items, then the flaw
        rejected = toy_response(rng, k, category, flaw)
        if rejected != chosen:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def toy_sft_rows(n, flawed_fraction, seed=0):
    rng, rows = random.Random(seed + 1), []
    for _ in range(n):
        prompt, k, category = toy_prompt(rng)
        flaw = rng.choice(TOY_FLAWS) if rng.random() < flawed_fraction else None
        rows.append({"prompt": prompt, "completion": toy_response(rng, k, category, flaw)})
    return rows


def toy_prompt_rows(n, seed=0):
    rng = random.Random(seed + 2)
    return [{"prompt": toy_prompt(rng)[0]} for _ in range(n)]


def build_toy_tokenizer():
    """A byte-level BPE trained on the toy corpus, with a chat template: toy and hub models then
    share every code path (apply_chat_template, eos handling, padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [r["prompt"] + " " + r["chosen"] + " " + r["rejected"] for r in toy_preference_rows(2000, seed=123)]
    special = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|end|>",
                                   chat_template=TOY_CHAT_TEMPLATE)


def build_toy_model(tokenizer):
    """A ~1M-parameter Llama from a config: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------------------------
# Data: preference datasets in both layouts, chat template, EOS appended, lengths checked.


def load_rows(name, split="train"):
    """A hub id or a local json/jsonl/parquet file, through `datasets`."""
    import datasets

    ext = os.path.splitext(name)[1].lstrip(".")
    if ext in ("json", "jsonl", "parquet"):
        if not os.path.exists(name):
            fail(f"dataset file {name} does not exist")
        try:
            ds = datasets.load_dataset("parquet" if ext == "parquet" else "json", data_files=name, split="train")
        except (datasets.exceptions.DatasetGenerationError, StopIteration):  # unparsable, or no rows at all
            fail(f"could not read {name}: it must hold {ext} records, one per example")
    elif os.path.isdir(name) or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        try:
            ds = datasets.load_dataset(name, split=split)
        except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
            fail(f"could not load dataset {name!r} ({type(e).__name__}); pass a hub id, a directory or a .json/.jsonl/.parquet file")
    else:
        fail(f"dataset {name!r} is neither a hub id (org/name) nor a .json/.jsonl/.parquet file")
    if len(ds) == 0:
        fail(f"dataset {name} has no rows")
    return ds


def split_conversation(row, key):
    """(prompt messages, response text) from a standard row (`prompt` + `key` strings) or a
    conversational one (`key` is a message list whose last turn is the assistant's response)."""
    value = row[key]
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
            fail(f"column {key!r}: a conversation must end with an assistant turn")
        messages, response = value[:-1], value[-1]["content"]
    else:
        prompt = row.get("prompt")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        response = value
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages) or not isinstance(response, str):
        fail(f"column {key!r}: message contents must be strings")
    return messages, response


def check_columns(ds, keys):
    """Standard layout needs `prompt` + keys; conversational needs only keys (message lists)."""
    missing = [k for k in keys if k not in ds.column_names]
    if missing or (not isinstance(ds[0][keys[0]], list) and "prompt" not in ds.column_names):
        fail(f"dataset needs columns {['prompt', *keys]} (or conversational {keys}); found {ds.column_names}")


def encode(tokenizer, messages, response, max_prompt_len, end_id):
    """Token ids of the chat-formatted prompt (cut from the left) and of response + end token."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_len:]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [end_id]
    return prompt_ids, response_ids


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


# ----------------------------------------------------------------------------------------------
# Models: tokenizer and model loading, dropout off, per-token values from a scalar head.


def check_model_path(path):
    if not os.path.isdir(path) and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        fail(f"model {path!r} does not exist (pass a directory or a hub id like org/name)")


def load_tokenizer(path):
    from transformers import AutoTokenizer

    check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        fail(f"could not load a tokenizer from {path!r}: {str(e).splitlines()[0]}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pad == eos is fine: masks, not pad ids, mark padding
    if tokenizer.chat_template is None:
        fail(f"tokenizer of {path!r} has no chat template; use an instruct/SFT model")
    return tokenizer


def load_model(path, kind="causal", bf16=False):
    """kind: 'causal' (policy, reference) or 'value' (LM backbone + linear head -> 1, no bias: reward
    model and critic, the layout of AutoModelForSequenceClassification(num_labels=1))."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path, num_labels=1)
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)  # Implementation detail: dropout off, else log-probs and values are noisy
        auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
        model = auto.from_pretrained(path, config=config, dtype=torch.bfloat16 if bf16 else torch.float32)
    except OSError as e:
        fail(f"could not load model {path!r}: {str(e).splitlines()[0]}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    return model


def forward(model, input_ids, attention_mask, **kwargs):
    """One forward with position ids from the attention mask, so left- and right-padded rows agree."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs)


def token_values(model, input_ids, attention_mask):
    """(B, T) head output at every position: the segment reward model's v[t] (PAPER §2), or the
    critic's value. The pooled sequence-classification logit is not used: it reads one position."""
    out = forward(model, input_ids, attention_mask, output_hidden_states=True)
    head = unwrap(model).score
    return head(out.hidden_states[-1].to(head.weight.dtype)).squeeze(-1).float()


def unwrap(model):
    """The model inside a DDP / accelerate wrapper."""
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------------------------
# PAPER §1: entropy segmentation. H[t] = entropy of softmax(logits[t]); token t closes a segment
# when H[t] > c; the last content token always closes one.


def token_entropy(logits):
    """(B, T, V) -> (B, T) entropy in nats, in float32 whatever the input dtype."""
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (B, T, V): the one extra tensor
    top, idx = logits.max(-1)
    log_z = top.float() - p.gather(-1, idx.unsqueeze(-1)).squeeze(-1).log()  # log-normalizer: z* - log p*
    return log_z - p.mul_(logits).sum(-1)  # H = log Z - E_p[z]


def segment_ends(entropy, content_mask, threshold):
    """(B, T) bool: content positions with entropy > threshold, plus each row's last content position."""
    content_mask = content_mask.bool()
    is_last = (content_mask.cumsum(-1) == content_mask.sum(-1, keepdim=True)) & content_mask
    return ((entropy > threshold) & content_mask) | is_last


def segment_scores(values, ends):
    """(B,) mean of `values` at the segment ends of each row (0 for a row with no segment)."""
    ends = ends.float()
    return (values * ends).sum(-1) / ends.sum(-1).clamp(min=1)


@torch.no_grad()
def reference_entropy(ref_model, input_ids, attention_mask, batch_size=64):
    """(N, T) entropies of the frozen reference model, computed once per example (no grad)."""
    chunks = [token_entropy(forward(ref_model, i, m).logits)
              for i, m in zip(input_ids.split(batch_size), attention_mask.split(batch_size))]
    return torch.cat(chunks) * attention_mask


# ----------------------------------------------------------------------------------------------
# Shared training plumbing: accelerate for devices / DDP / bf16, run directories, metrics.


def make_accelerator(args):
    from accelerate import Accelerator, DataLoaderConfiguration

    if args.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        fail("--bf16: this GPU has no bf16 support; drop --bf16")
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", gradient_accumulation_steps=args.grad_accum,
                              cpu=not torch.cuda.is_available(),  # lets torchrun on CPUs run DDP over gloo
                              # --batch-size is global; the data order is a function of (seed, epoch), so a resumed run sees the same batches
                              dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=args.seed))
    if args.batch_size % (args.grad_accum * accelerator.num_processes):
        fail(f"--batch-size {args.batch_size} must be a multiple of --grad-accum x processes "
             f"({args.grad_accum} x {accelerator.num_processes})")
    set_seed(args.seed)
    return accelerator


def prepare_output_dir(args, command, accelerator):
    """Refuse to mix two different runs in one directory unless --overwrite (--resume needs the same run)."""
    saved = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("overwrite", "resume", "save_every")}
    path = os.path.join(args.output_dir, "args.json")
    if os.path.exists(path) and not args.overwrite:
        with open(path) as f:
            if json.load(f) != {"command": command, **saved}:
                fail(f"{args.output_dir} holds a different run; pass --overwrite or another --output-dir")
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"command": command, **saved}, f, indent=1)
        if not args.resume:
            open(os.path.join(args.output_dir, "metrics.jsonl"), "w").close()


def log_metrics(args, accelerator, row):
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def checkpoints(output_dir):
    """Complete checkpoints in `output_dir`, oldest first (a `.tmp` one was never finished)."""
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)) if os.path.isdir(output_dir) else []
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def latest_checkpoint(output_dir):
    return (checkpoints(output_dir) or [None])[-1]


def save_checkpoint(accelerator, args, state):
    """Models, optimizers, schedulers and RNG states (accelerate's save_state) plus `state` (step, data
    position, ...), written to a temporary directory and then renamed: a crash never leaves half a checkpoint."""
    path = os.path.join(args.output_dir, f"checkpoint-{state['step']}")
    accelerator.save_state(path + ".tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
            state["metrics_rows"] = sum(1 for _ in f)
        with open(os.path.join(path + ".tmp", "state.json"), "w") as f:
            json.dump(state, f)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".tmp", path)
        for old in checkpoints(args.output_dir):  # keep only the newest checkpoint
            if old != path:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, args):
    """--resume: restore the latest checkpoint and drop the metrics rows logged after it; None if there is none."""
    path = latest_checkpoint(args.output_dir)
    if path is None:
        print(f"--resume: no checkpoint in {args.output_dir}, starting from the beginning", file=sys.stderr)
        return None
    accelerator.load_state(path)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    if accelerator.is_main_process:
        metrics = os.path.join(args.output_dir, "metrics.jsonl")
        with open(metrics) as f:
            rows = f.readlines()[:state["metrics_rows"]]
        with open(metrics, "w") as f:
            f.writelines(rows)
    print(f"resumed from {path}", file=sys.stderr)
    return state


def check_finite(accelerator, value, what, step, args):
    """Stop before a non-finite loss or reward reaches the weights (one host sync per optimizer step)."""
    if not torch.isfinite(accelerator.reduce(value.detach().float().sum(), "sum")):
        fail(f"non-finite {what} at step {step}; last good checkpoint: "
             f"{latest_checkpoint(args.output_dir) or 'none (pass --save-every N to keep some)'}")


def trainable(model, args, kind):
    """Gradient checkpointing and LoRA adapters (peft) for a model that trains, when asked for. LoRA on a
    value model also trains its scalar head (peft's SEQ_CLS task keeps `score` trainable)."""
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=args.lora_targets,
                                                 task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS"))
        for p in model.parameters():  # bf16 base weights stay frozen; what trains (adapters, the head) trains in fp32
            p.data = p.data.float() if p.requires_grad else p.data
    return model


def make_optimizer(model, args, total_steps):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)  # PAPER §2 betas
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def save_model(accelerator, model, tokenizer, output_dir):
    """save_pretrained output: loads with the standard Auto classes."""
    state_dict = accelerator.get_state_dict(model)  # every process takes part: FSDP gathers its shards here
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        if hasattr(model, "merge_and_unload"):  # LoRA: merge the adapters into plain weights
            model, state_dict = model.merge_and_unload(), None
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# SFT (toy only in the paper's pipeline: it starts from released SFT models). Loss on response tokens.


def sft(args):
    from tqdm.auto import tqdm

    if args.save_every or args.resume:
        fail("sft has no checkpoints (it is the toy's quick first stage); --save-every / --resume are for train-rm and ppo")
    args.output_dir = args.output_dir or TOY_SFT
    accelerator = make_accelerator(args)
    if args.model:
        tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    else:
        tokenizer = build_toy_tokenizer()
        model = build_toy_model(tokenizer)
    import datasets

    ds = load_rows(args.dataset) if args.dataset else datasets.Dataset.from_list(toy_sft_rows(3000, args.flawed_fraction, args.seed))
    key = "completion" if "completion" in ds.column_names else "chosen"
    check_columns(ds, [key])
    end_id = end_token_id(tokenizer, args.end_token)

    def encode_row(row):
        prompt_ids, response_ids = encode(tokenizer, *split_conversation(row, key), args.max_prompt_len, end_id)
        ids = (prompt_ids + response_ids)[:args.max_len]
        return {"input_ids": ids, "labels": ([-100] * len(prompt_ids) + response_ids)[:args.max_len]}

    ds = ds.map(encode_row, remove_columns=ds.column_names)
    collate = lambda rows: {"input_ids": pad_right([r["input_ids"] for r in rows], tokenizer.pad_token_id),
                            "labels": pad_right([r["labels"] for r in rows], -100),
                            "attention_mask": pad_right([[1] * len(r["input_ids"]) for r in rows], 0)}
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size // args.grad_accum, shuffle=True, collate_fn=collate)
    total = args.epochs * math.ceil(len(loader) / args.grad_accum)
    optimizer, scheduler = make_optimizer(model, args, total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    prepare_output_dir(args, "sft", accelerator)
    model.train()
    bar = tqdm(total=args.epochs * len(loader), desc="sft", disable=not accelerator.is_local_main_process)
    for epoch in range(args.epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = forward(model, batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step(), scheduler.step(), optimizer.zero_grad()
            bar.update()
            if bar.n % 20 == 0:  # a host sync only now and then
                bar.set_postfix(loss=f"{loss.item():.3f}")
        log_metrics(args, accelerator, {"epoch": epoch + 1, "sft/loss": loss.item()})
    save_model(accelerator, model, tokenizer, args.output_dir)
    return {"sft/loss": round(loss.item(), 4), "output_dir": args.output_dir}


def toy_sft_model():
    """The toy SFT model, trained on first use."""
    if not os.path.exists(os.path.join(TOY_SFT, "config.json")):
        print(f"building the toy SFT model in {TOY_SFT} ...", file=sys.stderr)
        sft(SFTArgs(overwrite=True))
    return TOY_SFT


# ----------------------------------------------------------------------------------------------
# PAPER §2: segment reward model. r_k = v[end_k]; score = mean_k r_k; Bradley-Terry loss.
# Bandit (c = inf): content includes the EOS, so the single segment is read at the EOS itself.


def prepare_pairs(ds, tokenizer, args, end_id):
    """Token ids of prompt / chosen / rejected; unusable pairs are skipped and counted."""
    check_columns(ds, ["chosen", "rejected"])

    def encode_row(row):
        messages, chosen = split_conversation(row, "chosen")
        prompt_ids, chosen_ids = encode(tokenizer, messages, chosen, args.max_prompt_len, end_id)
        _, rejected_ids = encode(tokenizer, *split_conversation(row, "rejected"), args.max_prompt_len, end_id)
        skip = ("empty response" if min(len(chosen_ids), len(rejected_ids)) < 2 else
                "chosen identical to rejected" if chosen_ids == rejected_ids else
                f"longer than --max-len {args.max_len}" if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > args.max_len else "")
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "skip": skip}

    ds = ds.map(encode_row, remove_columns=ds.column_names)
    skipped = {reason: ds["skip"].count(reason) for reason in set(ds["skip"]) - {""}}
    if skipped:
        print(f"skipped pairs: {skipped}", file=sys.stderr)
    ds = ds.filter(lambda r: not r["skip"]).remove_columns("skip")
    if len(ds) == 0:
        fail(f"no usable preference pairs left after filtering; skipped: {skipped}")
    return ds


def add_entropies_batch(rows, ref_model, pad_id, device):
    """datasets.map body: the reference model's entropy at every response token (PAPER §1), cached
    with the data so it costs one forward per example for the whole run, not one per step."""
    out = {}
    for key in ("chosen", "rejected"):
        seqs = [p + r for p, r in zip(rows["prompt_ids"], rows[f"{key}_ids"])]
        ids, mask = pad_right(seqs, pad_id).to(device), pad_right([[1] * len(s) for s in seqs], 0).to(device)
        ent = reference_entropy(ref_model, ids, mask).cpu()
        out[f"{key}_entropy"] = [e[len(p):len(s)].tolist() for e, p, s in zip(ent, rows["prompt_ids"], seqs)]
    return out


def pair_collate(pad_id, bandit):
    """Chosen rows then rejected rows in one (2B, T) batch; content = response, minus its EOS
    unless bandit (PAPER §1)."""
    def collate(rows):
        prompts = [r["prompt_ids"] for r in rows] * 2
        responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        seqs = [p + r for p, r in zip(prompts, responses)]
        start = torch.tensor([len(p) for p in prompts])[:, None]
        stop = torch.tensor([len(s) for s in seqs])[:, None] - (0 if bandit else 1)
        pos = torch.arange(max(len(s) for s in seqs))
        batch = {"input_ids": pad_right(seqs, pad_id), "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
                 "content_mask": (pos >= start) & (pos < stop)}
        if "chosen_entropy" in rows[0]:
            ents = [r["chosen_entropy"] for r in rows] + [r["rejected_entropy"] for r in rows]
            batch["entropy"] = pad_right([[0.0] * len(p) + e for p, e in zip(prompts, ents)], 0.0)
        else:
            batch["entropy"] = torch.zeros(batch["input_ids"].shape)  # bandit: entropies are not needed
        return batch
    return collate


def rm_forward(model, batch, threshold):
    """Per-token values, segment ends and sequence scores of a (2B, T) pair batch."""
    values = token_values(model, batch["input_ids"], batch["attention_mask"])
    ends = segment_ends(batch["entropy"], batch["content_mask"], threshold)
    return values, ends, segment_scores(values, ends)


@torch.no_grad()
def evaluate_rm(model, loader, threshold, accelerator):
    """Held-out accuracy, mean chosen / rejected score, segments per response, mean segment length."""
    model.eval()
    sums = torch.zeros(6, device=accelerator.device)
    for batch in loader:
        _, ends, scores = rm_forward(model, batch, threshold)
        chosen, rejected = scores.chunk(2)
        sums += torch.stack([(chosen > rejected).float().sum(), chosen.sum(), rejected.sum(), ends.sum(),
                             batch["content_mask"].sum(), torch.tensor(len(chosen), device=sums.device)])
    sums = accelerator.reduce(sums, "sum").tolist()
    model.train()
    n = sums[5]
    return {"rm/accuracy": sums[0] / n, "rm/chosen_score": sums[1] / n, "rm/rejected_score": sums[2] / n,
            "segment/per_response": sums[3] / (2 * n), "segment/mean_length": sums[4] / max(sums[3], 1)}


def rm_pairs(args, tokenizer):
    """The preference dataset (or the toy one), encoded and filtered."""
    import datasets

    end_id = end_token_id(tokenizer, args.end_token)
    ds = load_rows(args.dataset) if args.dataset else datasets.Dataset.from_list(toy_preference_rows(2200, args.seed))
    return prepare_pairs(ds, tokenizer, args, end_id)


def add_entropies(ds, args, accelerator, model_path, tokenizer):
    """Cached reference entropies for every pair, in --output-dir (the bandit needs none)."""
    import hashlib

    # The cache key: the encoded data's fingerprint and the reference model (a retrained local one too).
    stamp = os.path.getmtime(os.path.join(model_path, "config.json")) if os.path.isdir(model_path) else 0
    key = json.dumps([ds._fingerprint, os.path.abspath(model_path) if os.path.isdir(model_path) else model_path, stamp])
    cache = os.path.join(args.output_dir, f"entropy-{hashlib.sha1(key.encode()).hexdigest()[:16]}.arrow")
    with accelerator.main_process_first():  # the main process computes, the others read its cache file
        ref = None if os.path.exists(cache) else load_model(model_path, "causal", args.bf16).to(accelerator.device).eval()
        return ds.map(lambda rows: add_entropies_batch(rows, ref, tokenizer.pad_token_id, accelerator.device),
                      batched=True, batch_size=64, cache_file_name=cache, new_fingerprint=os.path.basename(cache),
                      load_from_cache_file=True, desc="reference entropies")


def train_rm(args):
    from tqdm.auto import tqdm

    args.output_dir = args.output_dir or TOY_RM
    accelerator = make_accelerator(args)
    model_path = args.model or toy_sft_model()
    tokenizer = load_tokenizer(model_path)
    threshold, bandit = args.entropy_threshold, math.isinf(args.entropy_threshold)
    ds = rm_pairs(args, tokenizer)
    if not 0 < args.eval_size < len(ds):
        fail(f"--eval-size {args.eval_size} must be between 1 and the {len(ds)} usable pairs - 1")
    prepare_output_dir(args, "train-rm", accelerator)  # input checked: from here on, files are written
    ds = ds if bandit else add_entropies(ds, args, accelerator, model_path, tokenizer)
    split = ds.train_test_split(test_size=args.eval_size, seed=args.seed)
    collate = pair_collate(tokenizer.pad_token_id, bandit)
    micro = args.batch_size // args.grad_accum
    train_loader = torch.utils.data.DataLoader(split["train"], batch_size=micro, shuffle=True, collate_fn=collate,
                                               generator=torch.Generator())  # not the global RNG (see ppo)
    eval_loader = torch.utils.data.DataLoader(split["test"], batch_size=micro, collate_fn=collate)
    set_seed(args.seed)  # the head's random init must not depend on what ran earlier in this process
    model = trainable(load_model(model_path, "value", args.bf16 and args.lora_rank > 0), args, "value")
    optimizer, scheduler = make_optimizer(model, args, args.epochs * math.ceil(len(train_loader) / args.grad_accum))
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, eval_loader, scheduler)
    # Where training stands: optimizer steps, epoch, batches done in it, and the epoch's loss so far.
    state = (load_checkpoint(accelerator, args) if args.resume else None) or {"step": 0, "epoch": 0, "batch": 0, "loss_sum": 0.0}
    step = state["step"]
    model.train()
    bar = tqdm(total=args.epochs * len(train_loader), initial=state["epoch"] * len(train_loader) + state["batch"],
               desc="train-rm", disable=not accelerator.is_local_main_process)
    for epoch in range(state["epoch"], args.epochs):
        done = state["batch"] if epoch == state["epoch"] else 0
        start, loss_sum = time.perf_counter(), torch.tensor(state["loss_sum"] if done else 0.0, device=accelerator.device)
        train_loader.set_epoch(epoch)
        for i, batch in enumerate(accelerator.skip_first_batches(train_loader, done) if done else train_loader, start=done + 1):
            with accelerator.accumulate(model):
                _, _, scores = rm_forward(model, batch, threshold)
                chosen, rejected = scores.chunk(2)
                loss = -F.logsigmoid(chosen - rejected).mean()  # Bradley-Terry
                loss_sum += loss.detach()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    check_finite(accelerator, loss_sum, "loss", step + 1, args)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step(), scheduler.step(), optimizer.zero_grad()
            bar.update()
            step += accelerator.sync_gradients
            if accelerator.sync_gradients and args.save_every and step % args.save_every == 0:
                save_checkpoint(accelerator, args, {"step": step, "epoch": epoch, "batch": i, "loss_sum": loss_sum.item()})
            if bar.n % 20 == 0:  # a host sync only now and then
                bar.set_postfix(loss=f"{loss.item():.3f}")
        metrics = {"epoch": epoch + 1, "step": step, "processes": accelerator.num_processes,
                   "rm/loss": accelerator.reduce(loss_sum, "mean").item() / len(train_loader),
                   "time/epoch_s": time.perf_counter() - start, **evaluate_rm(model, eval_loader, threshold, accelerator)}
        log_metrics(args, accelerator, metrics)
        bar.write(json.dumps(metrics)) if accelerator.is_main_process else None
    # PAPER §3: fit the location-aware normalizer on (a sample of) the training responses.
    sample = split["train"].select(range(min(args.norm_samples or len(split["train"]), len(split["train"]))))
    norm_loader = accelerator.prepare(torch.utils.data.DataLoader(sample, batch_size=micro, collate_fn=collate))
    normalizer = normalizer_settings(*collect_segment_rewards(model, norm_loader, threshold, accelerator))
    save_model(accelerator, model, tokenizer, args.output_dir)
    settings = {"entropy_threshold": threshold, "reference_model": os.path.abspath(model_path) if os.path.isdir(model_path) else model_path,
                "end_token": args.end_token or tokenizer.eos_token, **normalizer}
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, SETTINGS_FILE), "w") as f:
            json.dump(settings, f, indent=1)
    return {"eval_accuracy": round(metrics["rm/accuracy"], 4), "rm/loss": round(metrics["rm/loss"], 4),
            "segment/per_response": round(metrics["segment/per_response"], 2), "output_dir": args.output_dir,
            "entropy_threshold": threshold}


def load_rm_settings(path):
    file = os.path.join(path, SETTINGS_FILE)
    if not os.path.exists(file) and released_rm_settings(path):
        return released_rm_settings(path)
    if not os.path.exists(file):
        fail(f"reward model {path!r} has no {SETTINGS_FILE} (segmentation settings); train it with train-rm or use --preset")
    with open(file) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# PAPER §3: location-aware normalization. Segment k of K sits at p = k / K; its reward is normalized
# with mu(p) = a_mu ln p + b_mu and sigma(p) = a_sigma ln p + b_sigma, fitted by Huber regression
# on per-position means / stds. The bandit keeps one scalar mean / std.


def segment_positions(ends):
    """(B, T): k / K at the end of segment k of K, 0 elsewhere."""
    ends = ends.float()
    return ends.cumsum(-1) / ends.sum(-1, keepdim=True).clamp(min=1) * ends


def huber_fit(x, y, delta=1.35, iters=100):
    """Slope and intercept of y ~ a x + b, Huber loss, by iteratively reweighted least squares."""
    if x.unique().numel() < 2:
        return 0.0, y.mean().item()
    X, w = torch.stack([x, torch.ones_like(x)], 1).double(), torch.ones_like(x).double()
    y = y.double()
    for _ in range(iters):
        sw = w.sqrt()[:, None]
        coef = torch.linalg.lstsq(X * sw, y[:, None] * sw).solution.squeeze(1)
        resid = (y - X @ coef).abs()
        scale = (1.4826 * resid.median()).clamp(min=1e-8)  # robust residual scale (MAD)
        w = (delta * scale / resid.clamp(min=1e-12)).clamp(max=1.0)
    return coef[0].item(), coef[1].item()


def fit_location_normalizer(positions, rewards):
    """(a_mu, a_sigma, b_mu, b_sigma) from 1-D tensors of segment positions p and rewards r: group by
    p rounded to 3 decimals, take each group's mean and std, regress both on ln p."""
    groups, index = torch.unique(torch.round(positions.double() * 1000) / 1000, return_inverse=True)
    count = torch.bincount(index, minlength=len(groups)).double()
    mean = torch.zeros_like(groups).index_add_(0, index, rewards.double()) / count
    var = torch.zeros_like(groups).index_add_(0, index, (rewards.double() - mean[index]) ** 2) / count
    keep = count >= 2  # a single sample has no std
    x = groups[keep].log()
    (a_mu, b_mu), (a_sigma, b_sigma) = huber_fit(x, mean[keep]), huber_fit(x, var[keep].sqrt())
    return a_mu, a_sigma, b_mu, b_sigma


def normalize_segment_rewards(values, ends, params, min_position=0.0, min_sigma=1e-3):
    """(B, T): (v - mu(p)) / sigma(p) at segment ends, 0 elsewhere. Positions below `min_position` (the
    smallest p the normalizer was fitted on) use it instead: the fitted lines do not extrapolate."""
    a_mu, a_sigma, b_mu, b_sigma = params
    log_p = segment_positions(ends).clamp(min=max(min_position, 1e-12)).log()
    # Implementation detail: a fitted sigma line can cross zero; without the two guards a response cut
    # into many more segments than seen in fitting gets rewards divided by ~0 (seen: a toy policy hacked it).
    sigma = (a_sigma * log_p + b_sigma).clamp(min=min_sigma)
    return torch.where(ends.bool(), (values - (a_mu * log_p + b_mu)) / sigma, torch.zeros_like(values))


@torch.no_grad()
def collect_segment_rewards(model, loader, threshold, accelerator):
    """Score every response in `loader`: 1-D segment positions and rewards, and (N,) sequence scores."""
    model.eval()
    positions, rewards, scores = [], [], []
    for batch in loader:  # plain gather: a pair batch has 2B rows, which gather_for_metrics would cut to B
        values, ends, score = rm_forward(model, batch, threshold)
        pos = accelerator.gather(accelerator.pad_across_processes(segment_positions(ends), dim=1))
        val = accelerator.gather(accelerator.pad_across_processes(values * ends, dim=1))
        positions.append(pos[pos > 0].cpu()), rewards.append(val[pos > 0].cpu())
        scores.append(accelerator.gather(score).cpu())
    model.train()
    return torch.cat(positions), torch.cat(rewards), torch.cat(scores)


def normalizer_settings(positions, rewards, scores):
    """What PPO needs to normalize: the location-aware fit, and the scalar mean / std (bandit)."""
    return {"normalizer": list(fit_location_normalizer(positions, rewards)), "min_position": positions.min().item(),
            "mean": scores.mean().item(), "std": scores.std().item(), "norm_samples": len(scores)}


def fit_norm(args):
    """Fit (or refit) the normalizer of an existing reward model and save it in its settings file."""
    accelerator = make_accelerator(args)
    settings = load_rm_settings(args.reward_model)
    threshold = settings["entropy_threshold"]
    ref_path = settings["reference_model"]
    tokenizer = load_tokenizer(args.reward_model)
    args.output_dir, args.end_token = args.reward_model, args.end_token or settings["end_token"]
    ds = rm_pairs(args, tokenizer)
    ds = ds if math.isinf(threshold) else add_entropies(ds, args, accelerator, ref_path, tokenizer)
    ds = ds.select(range(min(args.norm_samples or len(ds), len(ds))))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, collate_fn=pair_collate(tokenizer.pad_token_id, math.isinf(threshold)))
    model, loader = load_model(args.reward_model, "value", args.bf16).to(accelerator.device), accelerator.prepare(loader)
    positions, rewards, scores = collect_segment_rewards(model, loader, threshold, accelerator)
    settings.update(normalizer_settings(positions, rewards, scores))
    if accelerator.is_main_process:
        with open(os.path.join(args.reward_model, SETTINGS_FILE), "w") as f:
            json.dump(settings, f, indent=1)
        if args.plot:
            plot_normalizer(args.plot, positions, rewards, settings["normalizer"])
    return {"normalizer": settings["normalizer"], "mean": settings["mean"], "std": settings["std"],
            "norm_samples": settings["norm_samples"], "output_dir": args.reward_model}


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
    plt.scatter(groups, mean, s=8, label="mean per position"), plt.scatter(groups, std, s=8, label="std per position")
    plt.plot(p, a_mu * p.log() + b_mu, label="mu(p)"), plt.plot(p, a_sigma * p.log() + b_sigma, label="sigma(p)")
    plt.xlabel("relative position p = k / K"), plt.legend(), plt.tight_layout(), plt.savefig(path)


# ----------------------------------------------------------------------------------------------
# PAPER §4: within-segment reward interpolation. PPO wants a reward per token; "even" gives every
# token of segment k the value r_k / len_k, so a segment's tokens sum to its reward.


def interpolate_rewards(seg_rewards, ends, content_mask, mode="even"):
    """(B, T): spread each segment's reward (held at its end position) over the segment's tokens."""
    ends, content = ends.bool(), content_mask.bool()
    if mode == "last":
        return torch.where(ends, seg_rewards, torch.zeros_like(seg_rewards))
    seg_id = (ends.long().cumsum(-1) - ends.long()).clamp(max=ends.shape[1] - 1)  # segment index of each token
    reward_of = torch.zeros_like(seg_rewards).scatter_add_(1, seg_id, torch.where(ends, seg_rewards, 0.0))
    length_of = torch.zeros_like(seg_rewards).scatter_add_(1, seg_id, content.to(seg_rewards.dtype))
    per_token = reward_of.gather(1, seg_id)
    if mode == "even":
        per_token = per_token / length_of.gather(1, seg_id).clamp(min=1)
    elif mode != "repeat":
        raise ValueError(f"interpolation mode must be even, last or repeat, got {mode!r}")
    return torch.where(content, per_token, torch.zeros_like(per_token))


# ----------------------------------------------------------------------------------------------
# PAPER §5: PPO against dense segment rewards. Per-token reward = clamp(r_t, -10, 10)
# - beta (log pi - log pi_ref); GAE (gamma 1, lambda 0.95); clipped policy and value losses.


@dataclass
class PPOArgs(Common):
    reward_model: str = field(default="", metadata={"help": "reward model directory from train-rm; empty: the toy one"})
    reward_mode: str = field(default="", metadata={"help": "default: follows the reward model's threshold", "choices": ("segment", "token", "bandit")})
    interpolation: str = field(default="even", metadata={"help": "within-segment split (paper: even)", "choices": ("even", "last", "repeat")})
    location_norm: bool = field(default=True, metadata={"help": "location-aware normalization (--no-location-norm: raw rewards)"})
    steps: int = field(default=120, metadata={"help": "PPO iterations (rollout batch + update)"})
    episodes: float = field(default=0.0, metadata={"help": "if > 0, sets --steps to this many passes over the prompts (paper: 2 Phi-3, 1 Llama)"})
    batch_size: int = field(default=64, metadata={"help": "rollout batch: prompts per iteration (global)"})
    mini_batch_size: int = field(default=16, metadata={"help": "train batch: rollouts per optimizer step (global)"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    lr: float = field(default=3e-5, metadata={"help": "actor learning rate"})
    critic_lr: float = field(default=1e-4, metadata={"help": "critic learning rate"})
    beta: float = field(default=0.1, metadata={"help": "KL penalty coefficient, fixed (paper: 0.01; 0.1 keeps the toy policy from lengthening lists)"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    clip_eps: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    value_clip: float = field(default=float("nan"), metadata={"help": "value clip (default: 0.25 dense, 0.2 bandit)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=24, metadata={"help": "generation length limit"})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the last reward of completions that never stop (paper: 0)"})
    eval_prompts: int = field(default=128, metadata={"help": "held-out prompts scored before and after training"})
    rollout_chunk: int = field(default=64, metadata={"help": "prompts generated and scored at once per process (memory knob)"})


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """(B, T) -> advantages, returns. delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l};
    the reverse recursion written as one matrix product: no Python loop over tokens."""
    mask = mask.float()
    next_values = F.pad((values * mask)[:, 1:], (0, 1))  # V after the last token is 0 (terminal)
    deltas = (rewards + gamma * next_values - values) * mask
    t = torch.arange(rewards.shape[1], device=rewards.device)
    lag = (t[None, :] - t[:, None]).float()  # (T, T): lag[s, u] = u - s
    discount = torch.where(lag >= 0, (gamma * lam) ** lag.clamp(min=0), 0.0)
    advantages = deltas @ discount.T
    return advantages * mask, (advantages + values) * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask):
    # Implementation detail: advantages whitened over the rollout batch (this process's share).
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def logprobs_of(logits, tokens, temperature):
    # Implementation detail: log-probs of the *sampling* distribution, so logits / temperature.
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def prompt_rows(ds):
    """Prompt messages from a `prompt` column, or from a conversation minus its last turn (PAPER §5)."""
    for key in ("prompt", "chosen", "messages"):
        if key in ds.column_names:
            break
    else:
        fail(f"prompt dataset needs a 'prompt' column or a conversational 'chosen' / 'messages'; found {ds.column_names}")

    def to_messages(row):
        value = row[key]
        if isinstance(value, str) and key == "prompt":
            return {"messages": [{"role": "user", "content": value}]}
        if not isinstance(value, list) or not value:
            fail(f"column {key!r} must hold a prompt string or a message list")
        return {"messages": value[:-1] if key != "prompt" and value[-1].get("role") == "assistant" else value}

    return ds.map(to_messages, remove_columns=ds.column_names)


@torch.no_grad()
def generate(policy, prompt_ids, prompt_mask, args, stop_ids, pad_id):
    """Sample responses: prompt + response ids and attention mask, the (B, R) response tokens, their
    mask up to and including the first stop token, the stop token itself, and whether each row stopped."""
    out = unwrap(policy).generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0,
                                  top_p=args.top_p, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                  eos_token_id=stop_ids, pad_token_id=pad_id)
    response = out[:, prompt_ids.shape[1]:]
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=response.device))
    # Implementation detail: everything after the first stop token is masked (it is padding or junk).
    mask = (is_stop.long().cumsum(-1) - is_stop.long()) == 0
    return out, torch.cat([prompt_mask, mask.long()], 1), response, mask, is_stop & mask, is_stop.any(-1)


def dense_rewards(rm_values, entropy, mask, stop, stopped, settings, args):
    """PAPER §1 + §3 + §4 on a rollout batch: segment the responses with the reference entropies,
    normalize each segment reward for its position, spread it over its tokens. Returns per-token
    rewards (B, R), segment ends, and the raw sequence score (mean segment reward)."""
    if args.reward_mode == "bandit":  # one segment, read at the EOS itself (or the last token when truncated)
        ends = segment_ends(entropy, mask, float("inf"))
        seg = (rm_values - settings["mean"]) / settings["std"] if args.location_norm else rm_values
        dense = torch.where(ends, seg, 0.0)
    else:
        content = mask & ~stop  # the stop token is not content
        ends = segment_ends(entropy, content, 0.0 if args.reward_mode == "token" else settings["entropy_threshold"])
        seg = (normalize_segment_rewards(rm_values, ends, settings["normalizer"], settings.get("min_position", 0.0))
               if args.location_norm else rm_values)
        dense = interpolate_rewards(seg, ends, content, args.interpolation)
    last = mask & (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True))
    dense = dense - args.missing_eos_penalty * (last & ~stopped[:, None])
    return dense, ends, segment_scores(rm_values, ends)


@torch.no_grad()
def score_responses(ref_logits, rm, seq, attn, response, mask, stop, stopped, settings, args):
    """One reference forward gives the KL log-probs and the entropies that segment the responses
    (PAPER §1); one reward-model forward gives the segment rewards. Returns (B, R) reference
    log-probs and dense rewards, the segment ends, and the raw (B,) RM score."""
    P = seq.shape[1] - response.shape[1]
    logits = ref_logits(seq, attn)
    ref_logprobs = logprobs_of(logits[:, P - 1:-1], response, args.temperature)
    entropy = token_entropy(logits[:, P:]) if args.reward_mode != "bandit" else torch.zeros_like(ref_logprobs)  # bandit: one segment
    dense, ends, score = dense_rewards(token_values(rm, seq, attn)[:, P:], entropy, mask, stop, stopped, settings, args)
    return ref_logprobs, dense, ends, score


@torch.no_grad()
def rollout(policy, ref_logits, critic, rm, prompt_ids, prompt_mask, settings, args, stop_ids, pad_id):
    """One rollout batch: responses, old log-probs, values, rewards, advantages and returns, all (B, R)."""
    seq, attn, response, mask, stop, stopped = generate(policy, prompt_ids, prompt_mask, args, stop_ids, pad_id)
    P = prompt_ids.shape[1]
    old_logprobs = logprobs_of(forward(policy, seq, attn).logits[:, P - 1:-1], response, args.temperature)
    values = token_values(critic, seq, attn)[:, P - 1:-1]
    ref_logprobs, dense, ends, score = score_responses(ref_logits, rm, seq, attn, response, mask, stop, stopped, settings, args)
    kl = (old_logprobs - ref_logprobs) * mask
    rewards = dense.clamp(-10, 10) - args.beta * kl
    advantages, returns = gae(rewards, values * mask, mask, args.gamma, args.lam)
    return {"seq": seq, "attn": attn, "response": response, "mask": mask.float(), "old_logprobs": old_logprobs,
            "values": values * mask, "advantages": advantages, "returns": returns,
            "score": score, "kl": kl.sum(-1), "ends": ends, "dense": dense, "stop": stop, "stopped": stopped.float()}


def ppo_update(policy, critic, opt_p, opt_c, batch, args, accelerator, P, step):
    """Clipped policy loss and clipped value loss on one mini-batch (CleanRL's names)."""
    mask = batch["mask"]
    with accelerator.accumulate(policy, critic):
        logits = forward(policy, batch["seq"], batch["attn"]).logits[:, P - 1:-1]
        logprobs = logprobs_of(logits, batch["response"], args.temperature)
        ratio = (logprobs - batch["old_logprobs"]).exp()
        pg_loss1 = -batch["advantages"] * ratio
        pg_loss2 = -batch["advantages"] * ratio.clamp(1 - args.clip_eps, 1 + args.clip_eps)
        pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
        new_values = token_values(critic, batch["seq"], batch["attn"])[:, P - 1:-1]
        v_clipped = batch["values"] + (new_values - batch["values"]).clamp(-args.value_clip, args.value_clip)
        v_loss = 0.5 * masked_mean(torch.max((new_values - batch["returns"]) ** 2, (v_clipped - batch["returns"]) ** 2), mask)
        check_finite(accelerator, pg_loss + v_loss, "PPO loss", step, args)
        accelerator.backward(pg_loss + v_loss)  # disjoint parameters: one backward serves both models
        accelerator.clip_grad_norm_(policy.parameters(), 1.0), accelerator.clip_grad_norm_(critic.parameters(), 1.0)
        opt_p.step(), opt_c.step(), opt_p.zero_grad(), opt_c.zero_grad()
    with torch.no_grad():
        entropy = masked_mean(token_entropy(logits.float() / args.temperature), mask)
        clipfrac = masked_mean(((ratio - 1).abs() > args.clip_eps).float(), mask)
    return torch.stack([pg_loss.detach(), v_loss.detach(), clipfrac, entropy])


@torch.no_grad()
def evaluate_policy(policy, rm, ref_logits, loader, settings, args, stop_ids, tokenizer, accelerator):
    """Mean RM score, exact toy score (toy task only) and flawed rate of samples on held-out prompts."""
    torch.manual_seed(args.seed + 1)  # the same sampling noise before and after training
    scores, toy, texts = [], [], []
    for batch in loader:
        seq, attn, response, mask, stop, stopped = generate(policy, batch["input_ids"], batch["attention_mask"], args,
                                                             stop_ids, tokenizer.pad_token_id)
        score = score_responses(ref_logits, rm, seq, attn, response, mask, stop, stopped, settings, args)[3]
        scores.append(accelerator.gather_for_metrics(score))
        texts += decode_responses(tokenizer, response, mask, stop)
        toy += [toy_score(p, t) for p, t in zip(batch["prompt_text"], texts[-len(response):])]
    out = {"reward": torch.cat(scores).mean().item()}
    if not args.dataset:
        toy = torch.tensor(accelerator.gather_for_metrics(toy), dtype=torch.float)
        out.update(toy_score=toy.mean().item(), flawed_rate=(toy < 1).float().mean().item())
    return out, texts


def cat_padded(tensors):
    """Concatenate rollout chunks along the batch, right-padding (B, T) tensors to the longest T with 0."""
    if tensors[0].dim() == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tensors])


def decode_responses(tokenizer, response, mask, stop):
    return [tokenizer.decode(r[m.bool() & ~s], skip_special_tokens=True) for r, m, s in zip(response, mask, stop)]


def ppo(args):
    from tqdm.auto import tqdm
    import datasets

    args.output_dir = args.output_dir or TOY_PPO
    rm_path = args.reward_model or (TOY_RM if not args.model else "") or fail("--reward-model is required with --model")
    if rm_path == TOY_RM and not os.path.exists(os.path.join(TOY_RM, SETTINGS_FILE)):
        print(f"building the toy reward model in {TOY_RM} ...", file=sys.stderr)
        train_rm(RMArgs(overwrite=True))
    settings = load_rm_settings(rm_path)
    bandit_rm = math.isinf(settings["entropy_threshold"])
    args.reward_mode = args.reward_mode or ("bandit" if bandit_rm else "token" if settings["entropy_threshold"] == 0 else "segment")
    if args.reward_mode not in ("segment", "token", "bandit") or (args.reward_mode == "bandit") != bandit_rm:
        fail(f"--reward-mode {args.reward_mode} does not fit a reward model trained with entropy threshold {settings['entropy_threshold']}")
    if args.location_norm and "normalizer" not in settings:
        fail(f"{rm_path} has no fitted normalizer: run fit-norm on it, or pass --no-location-norm")
    if math.isnan(args.value_clip):
        args.value_clip = 0.2 if args.reward_mode == "bandit" else 0.25  # PAPER §5
    accelerator = make_accelerator(args)
    if args.mini_batch_size % (args.grad_accum * accelerator.num_processes) or args.batch_size % args.mini_batch_size:
        fail(f"--mini-batch-size {args.mini_batch_size} must divide --batch-size and split over --grad-accum x processes")
    model_path = args.model or settings["reference_model"]
    tokenizer, rm_tokenizer = load_tokenizer(model_path), load_tokenizer(rm_path)
    if tokenizer.get_vocab() != rm_tokenizer.get_vocab():
        fail(f"the reward model {rm_path} and the policy {model_path} use different tokenizers; they must share one")
    tokenizer.padding_side = "left"  # Implementation detail: batched generation needs left padding
    end_id = end_token_id(tokenizer, args.end_token or settings["end_token"])

    # Prompts: toy prompts, or a dataset's prompts; the last --eval-prompts rows are held out.
    ds = datasets.Dataset.from_list(toy_prompt_rows(20 * args.batch_size + args.eval_prompts, args.seed)) if not args.dataset else load_rows(args.dataset)

    def encode_prompt(row):
        text = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
        return {"prompt_text": row["messages"][-1]["content"],
                "input_ids": tokenizer(text, add_special_tokens=False)["input_ids"][-args.max_prompt_len:]}

    ds = prompt_rows(ds).map(encode_prompt)
    if len(ds) <= args.eval_prompts + args.batch_size:
        fail(f"{len(ds)} prompts: need more than --eval-prompts ({args.eval_prompts}) + --batch-size ({args.batch_size})")
    train_ds, eval_ds = ds.select(range(len(ds) - args.eval_prompts)), ds.select(range(len(ds) - args.eval_prompts, len(ds)))
    if args.episodes > 0:
        args.steps = max(1, int(args.episodes * len(train_ds)) // args.batch_size)
    collate = lambda rows: {**tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt"),
                            "prompt_text": [r["prompt_text"] for r in rows]}
    # The loaders get their own generator: iterating one must not draw from the global RNG that sampling uses
    # (or a resumed run would sample differently from an uninterrupted one). The order itself is set per epoch.
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                                         generator=torch.Generator())
    eval_loader = torch.utils.data.DataLoader(eval_ds, batch_size=args.rollout_chunk, collate_fn=collate)
    prepare_output_dir(args, "ppo", accelerator)  # input checked: from here on, files are written

    # Models: actor = SFT policy; reference = frozen SFT policy; critic = SFT backbone + zero head; RM.
    frozen_bf16 = args.bf16 and args.lora_rank > 0  # with LoRA the base weights never train: keep them in bf16
    policy, critic = load_model(model_path, bf16=frozen_bf16), load_model(model_path, "value", frozen_bf16)
    torch.nn.init.zeros_(critic.score.weight)  # Implementation detail: a fresh head starts at 0, not at noise
    policy, critic = trainable(policy, args, "causal"), trainable(critic, args, "value")
    rm = load_model(rm_path, "value", args.bf16).eval().requires_grad_(False).to(accelerator.device)
    if args.lora_rank:  # the reference is the policy with its adapters off: no second copy of the weights
        def ref_logits(seq, attn):
            with unwrap(policy).disable_adapter():
                return forward(policy, seq, attn).logits
    else:
        ref = load_model(model_path, bf16=args.bf16).eval().requires_grad_(False).to(accelerator.device)
        ref_logits = lambda seq, attn: forward(ref, seq, attn).logits
    eos = policy.generation_config.eos_token_id  # an id, a list of ids (Phi-3 has several), or None
    stop_ids = sorted({end_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])})
    opt_p, sched_p = make_optimizer(policy, args, args.steps)
    opt_c, sched_c = make_optimizer(critic, dataclasses.replace(args, lr=args.critic_lr), args.steps)
    policy, opt_p = accelerator.prepare(policy, opt_p)  # one model per call: FSDP wraps models one at a time
    critic, opt_c = accelerator.prepare(critic, opt_c)
    loader, eval_loader = accelerator.prepare(loader, eval_loader)
    accelerator.register_for_checkpointing(sched_p, sched_c)
    state = load_checkpoint(accelerator, args) if args.resume else None
    if state is None:
        state = {"step": 0, "before": evaluate_policy(policy, rm, ref_logits, eval_loader, settings, args, stop_ids, tokenizer, accelerator)[0]}
    before, metrics = state["before"], state.get("metrics", {})

    bar = tqdm(range(state["step"], args.steps), desc="ppo", disable=not accelerator.is_local_main_process)
    for step in bar:
        start = time.perf_counter()
        epoch, i = divmod(step, len(loader))  # a pass over the prompts is an epoch of the loader
        if i == 0 or step == state["step"]:
            loader.set_epoch(epoch)
            batches = iter(accelerator.skip_first_batches(loader, i) if i else loader)
        batch = next(batches)
        policy.eval(), critic.eval()
        chunks = [rollout(policy, ref_logits, critic, rm, ids, mask, settings, args, stop_ids, tokenizer.pad_token_id)
                  for ids, mask in zip(batch["input_ids"].split(args.rollout_chunk), batch["attention_mask"].split(args.rollout_chunk))]
        data = {k: cat_padded([c[k] for c in chunks]) for k in chunks[0]}
        check_finite(accelerator, data["dense"], "reward", step + 1, args)
        data["advantages"] = whiten(data["advantages"], data["mask"])
        policy.train(), critic.train()
        P, n, mb = batch["input_ids"].shape[1], len(data["seq"]), args.mini_batch_size // accelerator.num_processes // args.grad_accum
        stats = []
        for _ in range(args.ppo_epochs):
            for idx in torch.randperm(n, device=data["seq"].device).split(mb):
                stats.append(ppo_update(policy, critic, opt_p, opt_c, {k: v[idx] for k, v in data.items()}, args, accelerator, P, step + 1))
        sched_p.step(), sched_c.step()
        stats = torch.stack(stats).mean(0)
        ends, mask = data["ends"].float(), data["mask"]
        toy = [toy_score(p, t) for p, t in zip(batch["prompt_text"], decode_responses(tokenizer, data["response"], mask, data["stop"]))]
        row = torch.stack([data["score"].mean(), data["kl"].mean(), mask.sum(-1).mean(), ends.sum(-1).mean(),
                           (mask.sum() / ends.sum().clamp(min=1)), data["stopped"].mean(), *stats,
                           torch.tensor(sum(toy) / len(toy), device=mask.device)])
        row = accelerator.reduce(row, "mean").tolist()
        metrics = dict(zip(["ppo/reward", "ppo/kl", "ppo/response_length", "segment/per_response", "segment/mean_length",
                            "ppo/stopped", "losses/policy", "losses/value", "ppo/clipfrac", "ppo/entropy", "ppo/toy_score"], row))
        if args.dataset:
            del metrics["ppo/toy_score"]  # the exact checker exists for the toy task only
        log_metrics(args, accelerator, {"step": step + 1, **metrics, "time/step_s": time.perf_counter() - start})
        bar.set_postfix(reward=f"{metrics['ppo/reward']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
        if accelerator.is_main_process and (step + 1) % max(1, args.steps // 4) == 0:
            bar.write(sample_table(tokenizer, data, 0))
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(accelerator, args, {"step": step + 1, "before": before, "metrics": metrics})

    after, texts = evaluate_policy(policy, rm, ref_logits, eval_loader, settings, args, stop_ids, tokenizer, accelerator)
    save_model(accelerator, policy, tokenizer, args.output_dir)
    result = {"reward_before": round(before["reward"], 4), "reward_after": round(after["reward"], 4)}
    if not args.dataset:
        result.update(toy_score_before=round(before["toy_score"], 4), toy_score_after=round(after["toy_score"], 4),
                      flawed_rate_before=round(before["flawed_rate"], 4), flawed_rate_after=round(after["flawed_rate"], 4))
    return {**result, "kl": round(metrics["ppo/kl"], 4), "reward_mode": args.reward_mode, "output_dir": args.output_dir}


def sample_table(tokenizer, data, i):
    """One rollout cut into its segments, each with its dense reward: what the method sees."""
    response, mask, ends, dense = data["response"][i], data["mask"][i].bool(), data["ends"][i], data["dense"][i]
    stops = ends.nonzero().squeeze(1).tolist()
    parts = [f"[{tokenizer.decode(response[a:b + 1])!s}|{dense[a:b + 1].sum().item():+.2f}]"
             for a, b in zip([0] + [s + 1 for s in stops[:-1]], stops)]
    return "sample: " + " ".join(parts) + f"  ({int(mask.sum())} tokens)"


# ----------------------------------------------------------------------------------------------
# `segment`: see what the method sees: a response cut into its entropy segments, with rewards.

COLORS = ("\033[30;43m", "\033[30;46m")  # alternating backgrounds in the terminal


def segment(args):
    settings = load_rm_settings(args.reward_model) if args.reward_model else {}
    threshold = settings.get("entropy_threshold", 1.0) if math.isnan(args.entropy_threshold) else args.entropy_threshold
    if not threshold >= 0:
        fail(f"--entropy-threshold must be >= 0, got {threshold}")
    model_path = args.model or settings.get("reference_model") or toy_sft_model()
    tokenizer, ref = load_tokenizer(model_path), load_model(model_path).eval()
    if args.text:  # raw text: no template, no end token, every token is content
        prompt_ids, response_ids = [], tokenizer(args.text, add_special_tokens=False)["input_ids"]
    else:
        if args.dataset:
            rows = load_rows(args.dataset)
            if not 0 <= args.row < len(rows):
                fail(f"--row {args.row} is outside the dataset's {len(rows)} rows")
            check_columns(rows, ["chosen"])
            messages, response = split_conversation(rows[args.row], "chosen")
        elif args.response:
            messages, response = [{"role": "user", "content": args.prompt}], args.response
        else:
            messages, response = [{"role": "user", "content": "Name 3 colors."}], "Here are 3 colors: black, green, pink."
        prompt_ids, response_ids = encode(tokenizer, messages, response, 10**9, end_token_id(tokenizer, args.end_token or settings.get("end_token", "")))
    if not response_ids:
        fail("the response is empty")
    ids = torch.tensor([prompt_ids + response_ids])
    mask = torch.ones_like(ids)
    P, R = len(prompt_ids), len(response_ids)
    entropy = reference_entropy(ref, ids, mask)[:, P:]  # (1, R)
    content = torch.ones(1, R, dtype=torch.bool)
    content[0, -1] = bool(args.text) or math.isinf(threshold)  # the end token is content only for the bandit
    ends = segment_ends(entropy, content, threshold)[0]
    rewards = None
    if args.reward_model:
        rewards = token_values(load_model(args.reward_model, "value").eval(), ids, mask)[0, P:].detach()
    stops = ends.nonzero().squeeze(1).tolist()
    rows = [{"text": tokenizer.decode(response_ids[a:b + 1]), "entropy": round(entropy[0, b].item(), 3),
             **({"reward": round(rewards[b].item(), 3)} if rewards is not None else {})}
            for a, b in zip([0] + [s + 1 for s in stops[:-1]], stops)]
    print("".join(f"{COLORS[k % 2]}{r['text']}\033[0m" for k, r in enumerate(rows)))
    for k, r in enumerate(rows):
        print(f"{k + 1:3d}  H={r['entropy']:6.3f}" + (f"  r={r['reward']:+7.3f}" if "reward" in r else "") + f"  {r['text']!r}")
    if args.html:
        write_segments_html(args.html, rows, threshold)
    return {"entropy_threshold": threshold, "segments": rows}


def write_segments_html(path, rows, threshold):
    spans = "".join(f'<span style="background:{("#fde68a", "#a5f3fc")[k % 2]}" title="H={r["entropy"]}'
                    + (f' r={r["reward"]}' if "reward" in r else "") + f'">{html.escape(r["text"])}</span>'
                    for k, r in enumerate(rows))
    table = "".join(f"<tr><td>{k + 1}</td><td>{r['entropy']}</td><td>{r.get('reward', '')}</td>"
                    f"<td>{html.escape(r['text'])}</td></tr>" for k, r in enumerate(rows))
    with open(path, "w") as f:
        f.write(f"<!doctype html><meta charset=utf-8><title>segments</title><p>entropy cutoff c = {threshold}</p>"
                f"<p style='font:16px monospace;white-space:pre-wrap'>{spans}</p><table border=1 cellpadding=4>"
                f"<tr><th>k</th><th>entropy at end</th><th>reward</th><th>segment</th></tr>{table}</table>")


# ----------------------------------------------------------------------------------------------
# Command line: one subcommand per stage; dataclass fields become flags, checked before anything runs.

RANGES = {  # flag: (test, what it must be)
    "lr": (lambda v: 0 < v <= 1, "in (0, 1]"), "critic_lr": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "entropy_threshold": (lambda v: v >= 0, ">= 0 (0: token level, inf: bandit)"),
    "batch_size": (lambda v: v >= 1, ">= 1"), "grad_accum": (lambda v: v >= 1, ">= 1"), "epochs": (lambda v: v >= 1, ">= 1"),
    "max_len": (lambda v: v >= 2, ">= 2"), "max_prompt_len": (lambda v: v >= 1, ">= 1"), "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "save_every": (lambda v: v >= 0, ">= 0"), "lora_rank": (lambda v: v >= 0, ">= 0"), "eval_size": (lambda v: v >= 1, ">= 1"),
    "norm_samples": (lambda v: v >= 0, ">= 0"), "flawed_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "steps": (lambda v: v >= 1, ">= 1"), "episodes": (lambda v: v >= 0, ">= 0"), "mini_batch_size": (lambda v: v >= 1, ">= 1"),
    "ppo_epochs": (lambda v: v >= 1, ">= 1"), "beta": (lambda v: v >= 0, ">= 0"), "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "lam": (lambda v: 0 <= v <= 1, "in [0, 1]"), "clip_eps": (lambda v: v > 0, "> 0"), "temperature": (lambda v: v > 0, "> 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "eval_prompts": (lambda v: v >= 1, ">= 1"), "rollout_chunk": (lambda v: v >= 1, ">= 1"),
}


def check_ranges(args):
    """Out-of-range flags fail with one line before any model or file is touched (NaN fails every test)."""
    if not isinstance(args, Common):
        return
    for name, (ok, what) in RANGES.items():
        if hasattr(args, name) and not ok(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")
    if args.max_prompt_len >= args.max_len:
        fail(f"--max-prompt-len ({args.max_prompt_len}) must be below --max-len ({args.max_len})")
    if isinstance(args, PPOArgs) and args.max_prompt_len + args.max_new_tokens > args.max_len:
        fail(f"--max-prompt-len + --max-new-tokens ({args.max_prompt_len} + {args.max_new_tokens}) must not exceed --max-len ({args.max_len})")

COMMANDS = {"sft": (sft, SFTArgs), "train-rm": (train_rm, RMArgs), "fit-norm": (fit_norm, FitNormArgs),
            "ppo": (ppo, PPOArgs), "segment": (segment, SegmentArgs)}


def add_dataclass_args(parser, cls):
    for f in dataclasses.fields(cls):
        name, help = "--" + f.name.replace("_", "-"), f.metadata.get("help")
        if f.type is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            parser.add_argument(name, type=f.type, default=f.default, help=help, choices=f.metadata.get("choices"))


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage block; --help has the rest
        fail(f"{message} (see {self.prog} --help)")


def parse_args(argv=None):
    parser = ArgumentParser(prog="segment_rlhf.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    subparsers = {name: sub.add_parser(name) for name in COMMANDS}
    for name, (_, cls) in COMMANDS.items():
        add_dataclass_args(subparsers[name], cls)
    ns = parser.parse_args(argv)
    if getattr(ns, "preset", ""):  # a preset changes the defaults; flags given explicitly still win
        subparsers[ns.command].set_defaults(**preset_defaults(ns.preset, ns.command))
        ns = parser.parse_args(argv)
    cls = COMMANDS[ns.command][1]
    return ns.command, cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def main(argv=None):
    command, args = parse_args(argv)
    check_ranges(args)
    if getattr(args, "dry_run", False):
        print(json.dumps({"command": command, **dataclasses.asdict(args)}, indent=1))
        return dataclasses.asdict(args)
    result = COMMANDS[command][0](args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
