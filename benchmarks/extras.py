"""What segment_rlhf.py leaves out of its reading, imported by it where used: the views of a
response cut into its segments (`segment` in the terminal, `segment --html` as a page), the
normalizer plot (`fit-norm --plot`, benchmarks/make_figures.py) and the GGUF conversion
(`--model FILE.gguf`).

- segments_terminal: the response on one line, each segment on its reward's colour, then a
  numbered table; segments_html: a self-contained page, each response with its segments shaded
  by reward (red below zero, green above) and a bar under every token for its entropy, the
  cutoff drawn across.
- plot_normalizer: the segment rewards' mean and std at each position p = k / K, as the fit sees
  them, with the fitted location-aware lines mu(p) and sigma(p) (needs matplotlib).
- quick_start (quick_start_plan, quick_start_summary), stage_line: what the quick start says
  before, during and after its run; sample_table: a PPO rollout cut into its segments, each with
  its dense reward, printed now and then.
- gguf_folder: a GGUF checkpoint as a plain transformers folder in the cache, converted once.
"""

import hashlib
import html
import math
import os
import shutil
import sys
import time

import torch
from filelock import FileLock

# The segment view's colours: white at reward 0, red below and green above, full at |r| = scale
# (the largest |reward| shown, so one page shares one scale); grey tints when there is no reward.
RED, GREEN, GREYS = (226, 92, 82), (84, 178, 106), ((236, 240, 245), (222, 228, 236))


def segment_rgb(segment, k, scale):
    """Background of segment k: by its reward on the diverging scale, else alternating greys."""
    if segment.get("reward") is None:
        return GREYS[k % 2]
    t = min(1.0, abs(segment["reward"]) / scale)
    return tuple(round(255 + (c - 255) * t) for c in (RED if segment["reward"] < 0 else GREEN))


def reward_scale(views):
    return max((abs(s.get("reward") or 0) for v in views for s in v["segments"]), default=0) or 1


def segments_terminal(segments, color):
    """The response on one line, each segment on its reward's colour (24-bit ANSI) when `color`,
    else plain and separated by ' | '; then a numbered table of the segments."""
    scale = reward_scale([{"segments": segments}])
    parts = []
    for k, seg in enumerate(segments):
        text = seg["text"].replace("\n", "\\n")
        if color:
            rgb = ";".join(map(str, segment_rgb(seg, k, scale)))
            text = f"\033[48;2;{rgb}m\033[38;2;27;31;36m{text}\033[0m"
        parts.append(text)
    lines = ["".join(parts) if color else " | ".join(parts)]
    for k, seg in enumerate(segments):
        reward = "" if seg.get("reward") is None else f"  r={seg['reward']:+7.3f}"
        lines.append(f"{k + 1:3d}  H={seg['entropy']:6.3f}{reward}  {seg['text']!r}")
    return "\n".join(lines)


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
.prompt{color:#57606a;font-size:13px;margin:2px 0 6px} .prompt b{color:#1b1f24}
.bar{position:relative;height:30px;background:#f3f5f7;border-bottom:1px solid #c8ccd1}
.bar i{position:absolute;bottom:0;left:1px;right:1px;background:#aab4c0}
.bar i.hi{background:#24303d}
@media(max-width:700px){.views{grid-template-columns:1fr!important}}
"""


def segments_html(views, threshold):
    """A self-contained page: each response with its segments shaded by reward, a bar under
    every token for its entropy (dark above the cutoff, drawn as a line), numbers on hover."""
    scale = reward_scale(views)
    h_max = max([h for v in views for s in v["segments"] for h in s["token_entropy"]], default=1)
    h_max = max(h_max, 1.25 * threshold if math.isfinite(threshold) else 0, 1e-6)
    css = PAGE_CSS
    if math.isfinite(threshold):  # the cutoff line across every entropy bar
        css += ".bar::after{content:'';position:absolute;left:0;right:0;"
        css += f"bottom:{100 * threshold / h_max:.1f}%;border-top:2px dashed #d9480f}}"
    sections = [view_html(v, scale, h_max, threshold) for v in views]
    legend = "bars: each token's entropy H under the reference model, dark above the cutoff"
    if math.isfinite(threshold):
        legend += f"; <span style='color:#d9480f'>dashed line</span>: the cutoff c = {threshold:g}"
        legend += " (a token above it closes its segment)"
    rewarded = any(s.get("reward") is not None for v in views for s in v["segments"])
    if rewarded:
        ends = [f"rgb{segment_rgb({'reward': r}, 0, 1)}" for r in (-1, 1)]
        grad = f"linear-gradient(to right,{ends[0]},#fff,{ends[1]})"
        ticks = "".join(f"<span>{t}</span>" for t in (f"{-scale:+.2f}", "0", f"{scale:+.2f}"))
        scale_key = f"segment reward<div class=grad style='background:{grad}'></div>"
        legend = f"{scale_key}<div class=ticks>{ticks}</div></div><div>{legend}"
    legend = f"<div>{legend}</div>"  # one flex item per key
    columns = f"repeat({min(2, len(views))},minmax(0,1fr))"
    title = "Segment-level rewards" if rewarded else "Entropy segments (no reward model)"
    return (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{title}, c = {threshold:g}"
        f"</title><style>{css}</style><h1>{title}</h1><div class=sub>entropy "
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
    prompt = (
        view.get("prompt")
        and f"<div class=prompt><b>prompt</b> {html.escape(view['prompt'])}</div>"
    )
    return (
        f"<section class=view><h2>{html.escape(view['title'])}</h2>{prompt or ''}<div class=sub>"
        f"{summary}</div><div class=resp>{''.join(spans)}</div></section>"
    )


def plot_normalizer(path, positions, rewards, params, common=20):
    """What the fit sees: the mean and std of the segment rewards at each distinct position p
    (rounded to 3 decimals, as fit_location_normalizer groups them), a marker's area growing with
    the segments it holds, and the fitted lines. Positions held by fewer than `common` segments
    are drawn apart: they come from the rare answers cut into many more segments than usual, and
    they are as many points of the regression as the common positions (README: the normalizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a_mu, a_sigma, b_mu, b_sigma = params
    from segment_rlhf import position_groups  # the grouping the fit uses

    groups, count, mean, std = position_groups(positions, rewards)
    size = 6 + 120 * (count / count.max()).sqrt()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for rare, name, alpha in (
        (False, f">= {common} segments", 1.0),
        (True, f"< {common} (rare)", 0.45),
    ):
        held = (count < common) if rare else (count >= common)
        for values, colour, what in ((mean, "C0", "mean"), (std, "C1", "std")):
            label = f"{what}, a p held by {name}"
            ax.scatter(groups[held], values[held], s=size[held], c=colour, alpha=alpha, label=label)
    p = torch.linspace(max(groups.min().item(), 1e-3), 1, 200)
    ax.plot(p, a_mu * p.log() + b_mu, "C0", label=f"mu(p) = {a_mu:.2f} ln p {b_mu:+.2f}")
    ax.plot(
        p, a_sigma * p.log() + b_sigma, "C1", label=f"sigma(p) = {a_sigma:.2f} ln p {b_sigma:+.2f}"
    )
    ax.set_xlabel("relative position p = k / K of a segment in its response")
    ax.set_ylabel("segment reward, raw")
    ax.set_title(
        f"Location-aware normalizer: {len(rewards)} segment rewards, {len(groups)} positions"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")  # `path` may be a temporary name without .png
    plt.close(fig)


# The quick start (`ppo` with no arguments, or `--preset look`) says what it does, stage by stage.
QUICK_START = {
    "sft": "SFT model (a 0.8M-parameter Llama learns to answer 'Name 7 fruits.')",
    "train-rm": "segment reward model (trained on preference pairs, cut at entropy 1.0)",
    "ppo": "policy (PPO against the segment rewards, {steps} steps)",
}


def quick_start(ppo, args, sft_dir):
    """A toy ppo run: the plan before it, unless it finished before; the summary after."""
    finished = not args.overwrite and os.path.isfile(os.path.join(args.output_dir, "result.json"))
    if not finished:
        quick_start_plan(args, sft_dir, look="look" in sft_dir)
    start = time.perf_counter()
    result = ppo(args)
    if "toy_score_after" in result:
        quick_start_summary(args, result, not finished and time.perf_counter() - start, sft_dir)
    return result


def stage_line(args, command, result, seconds, look):
    """How a stage of the quick start went, and for the first how long the rest will take."""
    if command == "sft":
        figures = f"loss {result['sft/loss']:.3f}"
        rest = seconds * (1.6 if look else 3.9)  # reward model + PPO time / SFT time, measured
        figures += f"; at this speed the rest takes about {rest / 60:.0f} min"
    else:
        figures = f"pair accuracy {result['eval_accuracy']:.3f}"
        if result.get("segment_accuracy") is not None:
            figures += f", per-segment accuracy {result['segment_accuracy']:.3f}"
        figures += f" on {args.eval_size} held-out pairs (in {args.output_dir}/result.json)"
    return f"{command}: done in {seconds:.0f} s, {figures}"


def quick_start_plan(args, sft_dir, look):
    """The stages of a toy ppo run with the models it will build, before it starts."""
    stages = [(sft_dir, "sft"), (args.reward_model, "train-rm")]
    todo = [(p, c) for p, c in stages if not os.path.isfile(os.path.join(p, "config.json"))]
    todo.append((args.output_dir, "ppo"))
    lines = [f"  {c:8} {p:14} {QUICK_START[c].format(steps=args.steps)}" for p, c in todo]
    when = "about 2 min" if look else "4 to 7 min"
    head = f"the toy quick start: {len(lines)} stage(s), {when} on 2 CPU cores"
    print("\n".join([head, *lines]), file=sys.stderr)


def quick_start_summary(args, result, seconds, sft_dir):
    """Where the models are, the score before and after, and what to look at next."""
    before, after = result["toy_score_before"], result["toy_score_after"]
    flawed = f"{result['flawed_rate_before']:.0%} -> {result['flawed_rate_after']:.0%}"
    took = f"done in {seconds / 60:.1f} min" if seconds else "done before"
    lines = [
        f"{took}. On {args.eval_prompts} held-out prompts:",
        f"  exact toy score {before:.3f} -> {after:.3f} (1: every item of every answer right);"
        f" answers with a flaw {flawed}",
        f"  models: {sft_dir} (SFT), {args.reward_model} (reward model), {result['output_dir']}"
        " (policy; metrics.jsonl: a row per PPO step)",
        "  look at the segments and their rewards:"
        f" python segment_rlhf.py segment --reward-model {args.reward_model} --html segments.html",
        "  draw the learning curves and the normalizer: python benchmarks/make_figures.py",
    ]
    print("\n".join(lines), file=sys.stderr)


def sample_table(tokenizer, data, i):
    """One rollout cut into its segments, each with its dense reward: what the method sees."""
    response, ends, dense = data["response"][i], data["ends"][i], data["dense"][i]
    stops = ends.nonzero().squeeze(1).tolist()
    spans = zip([0] + [s + 1 for s in stops[:-1]], stops)
    parts = [
        f"[{tokenizer.decode(response[a : b + 1])}|{dense[a : b + 1].sum().item():+.2f}]"
        for a, b in spans
    ]
    return "sample: " + " ".join(parts) + f"  ({int(data['mask'][i].sum())} tokens)"


def gguf_folder(path, cache):
    """A GGUF checkpoint (llama.cpp's format) as a transformers folder in `cache`, converted on
    first use: transformers reads GGUF (with the `gguf` package) into an ordinary model with its
    tokenizer and chat template, but will not save it as loaded, so the folder is written once
    without the GGUF marking (under a temporary name, then renamed) and every later load is a
    plain from_pretrained. The folder's name follows the file's path, size and time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = os.stat(path)
    key = hashlib.sha1(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = os.path.join(cache, f"{os.path.basename(path)[: -len('.gguf')]}-{key}")
    with FileLock(folder + ".lock"):  # the processes of one launch convert it once, not each
        if os.path.exists(folder):
            return folder
        import gguf  # noqa: F401  (transformers reads GGUF through it: checked before the work)

        print(f"converting {path} into {folder} (once) ...", file=sys.stderr)
        where, file = os.path.dirname(path), os.path.basename(path)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
        model.hf_quantizer.remove_quantization_config(model)  # the weights are float32 already
        tmp = f"{folder}.tmp{os.getpid()}"
        try:  # a full disk leaves no half folder in the cache
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
