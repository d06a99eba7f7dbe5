"""How often a saved segment reward model ranks fresh toy pairs right: by its segment score (the
mean of its segment rewards, what it was trained on) and by the pooled logit that
AutoModelForSequenceClassification and pipeline("text-classification") return (the head's value
at the last token).

    python benchmarks/pooled_logit.py                    # runs/toy-rm, 300 fresh toy pairs
    python benchmarks/pooled_logit.py --reward-model DIR --pairs 1000
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import segment_rlhf as S  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward-model", default=S.TOY_RM)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=12345, help="not a seed the toy trains on")
    a = parser.parse_args()
    rows = S.toy_preference_rows(a.pairs, seed=a.seed)
    conversations = [(r["prompt"], r[k]) for k in ("chosen", "rejected") for r in rows]
    scores = [o["score"] for o in S.segment_rewards(a.reward_model, conversations)]
    segment = sum(c > r for c, r in zip(scores[: len(rows)], scores[len(rows) :])) / len(rows)
    tokenizer = S.load_tokenizer(a.reward_model)
    model = S.load_model(a.reward_model, "value").eval()
    end_id = S.end_token_id(tokenizer, S.load_rm_settings(a.reward_model)["end_token"])
    pooled = []
    with torch.no_grad():
        for prompt, response in conversations:
            messages = [{"role": "user", "content": prompt}]
            prompt_ids, response_ids = S.encode(tokenizer, messages, response, 10**9, end_id)
            ids = torch.tensor([prompt_ids + response_ids])
            pooled.append(model(input_ids=ids).logits[0, 0].item())
    right = sum(c > r for c, r in zip(pooled[: len(rows)], pooled[len(rows) :])) / len(rows)
    print(f"{len(rows)} fresh pairs ranked right: segment score {segment:.1%}, pooled {right:.1%}")


if __name__ == "__main__":
    main()
