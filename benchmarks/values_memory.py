"""Peak memory of the per-token value read-out: the head's output caught by a forward hook (what
`segment_rlhf.token_values` does) vs the last of all hidden states (`output_hidden_states=True`).

    python benchmarks/values_memory.py             # CPU: peak RSS of each read-out, own process
    python benchmarks/values_memory.py --device cuda

A random Llama value model (--layers x --width, no download) reads --batch x --tokens tokens once
without gradients; each read-out runs in a fresh process, and the figure is its peak memory above
the model's own (max RSS on CPU, torch.cuda.max_memory_allocated on a GPU).
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import segment_rlhf as S  # noqa: E402


def peak_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hidden_states_readout(model, ids, mask):
    """The read-out this replaced: keep every layer's output, apply the head to the last."""
    out = S.forward(model, ids, mask, output_hidden_states=True)
    return model.score(out.hidden_states[-1]).squeeze(-1)


def one(a):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=a.width,
        intermediate_size=a.width * 3,
        num_hidden_layers=a.layers,
        num_attention_heads=a.width // 64,
        num_key_value_heads=a.width // 64,
        num_labels=1,
        pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config).to(a.device).eval()
    ids = torch.randint(1, 512, (a.batch, a.tokens), device=a.device)
    mask = torch.ones_like(ids)
    before = peak_mb(a.device)
    with torch.no_grad():
        readout = S.token_values if a.readout == "hook" else hidden_states_readout
        values = readout(model, ids, mask)
    assert values.shape == (a.batch, a.tokens)
    print(json.dumps({"readout": a.readout, "extra_mb": round(peak_mb(a.device) - before)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--readout", choices=("hook", "hidden"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.readout:
        return one(a)
    rows = []
    for readout in ("hidden", "hook"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--readout", readout]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    size = f"{a.layers} layers x {a.width}, {a.batch} x {a.tokens} tokens, {a.device}"
    hidden, hook = rows[0]["extra_mb"], rows[1]["extra_mb"]
    print(
        f"{size}: output_hidden_states +{hidden} MB, head hook +{hook} MB "
        f"(ratio {hook / max(hidden, 1):.2f})"
    )


if __name__ == "__main__":
    main()
