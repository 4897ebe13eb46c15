"""AWOT evaluations: controlled sentiment generation (paper Sec. 4.1) and preference accuracy on HH data.

Sentiment, offline: each movie-review opening becomes the paper's base prompt
"Here is a movie review from imdb: {text}". With ``prompt_format="chat"`` (default, for
instruct models) it is the user message of the model's chat template and the reply is
scored; with ``"plain"`` it is a raw continuation prompt (base models). The gold reward
is VADER's compound score of the generated text only (in [−1, 1]; the paper used
distilbert-imdb, which cannot be downloaded here). Methods, as in the paper's Fig. 5
and Appendix A.2: greedy ``base``; ``prompting`` (the positive system prompt); AWOT
``iterative`` and ``closed_form``; ``best_of_N`` sampling, ranked by the same VADER
scorer (an upper bound: it sees the gold reward). All greedy methods use the paper's
repetition penalty 1.5 (Appendix B.3). Methods run interleaved per batch of prompts so
that timing drift hits all of them alike; time per token is wall time over the tokens
of the returned continuations (for best-of-N: of the picked ones), and its ratio to
``base`` (plain greedy, same batch size) is reported. ``batch_size=1`` is the paper's
timing setting; larger batches (left-padded) only make the evaluation faster.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from meav_merge.awot import AWOTConfig, AWOTSteering, Anchors, load_causal_lm, manual_anchors
from meav_merge.data.schema import iter_jsonl
from meav_merge.io.rows import write_rows_csv
from meav_merge.evaluation.fluency import distinct_2

BASE_PROMPT = "Here is a movie review from imdb: {text}"
# Appendix A.2 (adapted by the authors from the LLaMA2 safety prompt).
POSITIVE_SYSTEM_PROMPT = (
    "You are a helpful, respectful and positive assistant. The text you answered should be always positive, "
    "such as nice movie, interesting idea, awesome director, etc. Always answer as helpfully and positive as "
    "possible, while being safe. Your answers should not include any harmful, negative, or illegal content. "
    "Please ensure that your responses are socially positive in nature."
)
DEFAULT_PROMPTS = "movie_review_openings.jsonl"
PROMPT_FORMATS = ("chat", "plain")


class EvalInputError(ValueError):
    pass


@dataclass
class SentimentEvalConfig:
    n: int = field(default=100, metadata={"help": "number of prompts (the first N of the file)"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens generated per reply"})
    repetition_penalty: float = field(default=1.5, metadata={"help": "paper, Appendix B.3: 1.5", "positive": True})
    alpha: float = field(default=2.0, metadata={"help": "AWOT step size α (paper: 2.0 for sentiment)", "minimum": 0})
    steps: int = field(default=60, metadata={"help": "AWOT ascent steps n (paper: 60)", "minimum": 0})
    penalty: float = field(default=0.0, metadata={"help": "λ of AWOT's L2 penalty", "minimum": 0})
    anchors: str = field(default="sentiment", metadata={"help": "named anchor set or JSON word file"})
    best_of: int = field(default=4, metadata={"help": "samples per prompt for the best-of-N baseline"})
    prompt_format: str = field(default="chat", metadata={
        "help": "prompt as the chat user message or as a raw continuation prompt", "choices": PROMPT_FORMATS,
        "flags": ("--format", "--prompt-format")})
    seed: int = field(default=0, metadata={"help": "sampling seed", "minimum": 0})
    batch_size: int = field(default=1, metadata={
        "help": "prompts per generate() call (1: the paper's timing setting; more: faster)"})
    methods: Tuple[str, ...] = field(default=(), metadata={
        "help": "comma-separated subset of methods (default: all; base always runs, it is the timing reference)"})

    def __post_init__(self):
        if self.prompt_format not in PROMPT_FORMATS:
            raise EvalInputError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}")
        if min(self.n, self.max_new_tokens, self.best_of, self.batch_size) < 1:
            raise EvalInputError("n, max_new_tokens, best_of and batch_size must be at least 1")
        unknown = [m for m in self.methods if m not in self.all_methods]
        if unknown:
            raise EvalInputError(f"unknown method '{unknown[0]}' (known: {', '.join(self.all_methods)})")

    @property
    def all_methods(self) -> Tuple[str, ...]:
        return ("base", "prompting", "awot_iterative", "awot_closed_form", f"best_of_{self.best_of}")

    @property
    def selected_methods(self) -> Tuple[str, ...]:
        chosen = self.methods or self.all_methods
        return ("base",) + tuple(m for m in chosen if m != "base")  # base is the timing reference


def read_openings(path: Union[str, os.PathLike]) -> List[dict]:
    """``{"id", "text"}`` per line; errors name file:line."""
    path = Path(path)
    out, seen = [], set()
    for ln, obj, _ in iter_jsonl(path, EvalInputError):
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) and obj[k].strip() for k in ("id", "text")):
            raise EvalInputError(f"{path}:{ln}: expected an object with non-empty 'id' and 'text'")
        if obj["id"] in seen:
            raise EvalInputError(f"{path}:{ln}: duplicate id '{obj['id']}'")
        seen.add(obj["id"])
        out.append({"id": obj["id"], "text": obj["text"].strip()})
    if not out:
        raise EvalInputError(f"{path}: no prompts")
    return out


_VADER = None


def vader_reward(text: str) -> float:
    """VADER compound sentiment of ``text`` (the gold reward)."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return float(_VADER.polarity_scores(text)["compound"])


def format_prompt(tokenizer, opening: str, system: Optional[str], prompt_format: str) -> str:
    from meav_merge.evaluation.scoring import chat_context

    user = BASE_PROMPT.format(text=opening)
    if prompt_format == "chat":
        return chat_context(tokenizer, user, system)
    return (f"{system}\n\n" if system else "") + user


@dataclass
class Generation:
    texts: List[str]
    counts: List[int]  # generated tokens per text, end-of-sequence included
    seconds: float  # wall time of the whole generate() call
    cpu_seconds: float  # process CPU time (all threads) of the call


@torch.no_grad()
def generate(model, tokenizer, prompts: Union[str, Sequence[str]], max_new_tokens: int,
             repetition_penalty: float = 1.5, sample: bool = False, num_return_sequences: int = 1,
             min_new_tokens: int = 0, logits_processor=None) -> "Generation":
    """Texts, generated token counts, wall and CPU seconds for a batch of prompts; greedy unless ``sample``.

    Prompts are left-padded into one batch; with ``num_return_sequences`` the outputs
    come grouped by prompt. A count includes the end-of-sequence token when one was made.
    """
    from meav_merge.evaluation.generation import cut_at_stop, left_padded, pad_token_id, stop_token_ids
    from meav_merge.evaluation.scoring import tok_encode

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    stop = stop_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, stop)
    ids, mask = left_padded([tok_encode(tokenizer, p) for p in prompts], pad, next(model.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                  pad_token_id=pad, eos_token_id=stop or None, attention_mask=mask)
    if sample:  # plain ancestral sampling, no truncation
        kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=num_return_sequences)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    if logits_processor is not None:
        kwargs["logits_processor"] = logits_processor
    start, cpu_start = time.perf_counter(), time.process_time()
    out = model.generate(ids, **kwargs)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    texts, counts = [], []
    for row in out[:, ids.shape[1]:].tolist():
        kept, stopped = cut_at_stop(row, stop)
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
        counts.append(len(kept) + stopped)  # the end-of-sequence token counts as generated
    return Generation(texts, counts, seconds, cpu_seconds)


def _run_method(method: str, model, tokenizer, openings: Sequence[str], cfg: SentimentEvalConfig,
                steering: Dict[str, AWOTSteering], seed: int) -> "Generation":
    """One batch of prompts through one method (best-of-N: the picked continuations)."""
    system = POSITIVE_SYSTEM_PROMPT if method == "prompting" else None
    prompts = [format_prompt(tokenizer, op, system, cfg.prompt_format) for op in openings]
    if method.startswith("best_of_"):
        torch.manual_seed(seed)
        gen = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.repetition_penalty,
                       sample=True, num_return_sequences=cfg.best_of)
        picked = [max(range(i * cfg.best_of, (i + 1) * cfg.best_of), key=lambda j: vader_reward(gen.texts[j]))
                  for i in range(len(prompts))]
        return Generation([gen.texts[j] for j in picked], [gen.counts[j] for j in picked], gen.seconds,
                          gen.cpu_seconds)
    hook = steering.get(method)
    if hook is not None:
        hook.attach()
    try:
        return generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.repetition_penalty)
    finally:
        if hook is not None:
            hook.detach()


def summarize(rows: List[dict], methods: Sequence[str]) -> List[dict]:
    summary = []
    base_spt = base_cpu = None
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        rewards = [r["reward"] for r in mine]
        tokens = max(1, sum(r["tokens"] for r in mine))
        spt = sum(r["seconds"] for r in mine) / tokens
        cpu = sum(r["cpu_seconds"] for r in mine) / tokens
        if m == "base":
            base_spt, base_cpu = spt, cpu
        mean = sum(rewards) / len(rewards)
        sd = math.sqrt(sum((x - mean) ** 2 for x in rewards) / max(1, len(rewards) - 1))
        summary.append({
            "method": m, "n": len(mine), "mean_reward": mean, "sem_reward": sd / math.sqrt(len(rewards)),
            "positive_rate": sum(x >= 0.05 for x in rewards) / len(rewards),
            "mean_tokens": tokens / len(mine), "distinct_2": sum(distinct_2(r["text"]) for r in mine) / len(mine),
            "s_per_token": spt, "time_ratio_to_greedy": spt / base_spt if base_spt else float("nan"),
            # CPU time is steadier than wall time on a shared machine.
            "cpu_s_per_token": cpu, "cpu_ratio_to_greedy": cpu / base_cpu if base_cpu else float("nan"),
        })
    return summary


def markdown_table(summary: List[dict]) -> str:
    head = ("| method | n | mean VADER reward (± s.e.) | positive rate | mean tokens | distinct-2 | wall / token "
            "| × greedy | CPU / token | × greedy |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {s['method']} | {s['n']} | {s['mean_reward']:+.3f} ± {s['sem_reward']:.3f} | {s['positive_rate']:.0%} "
        f"| {s['mean_tokens']:.1f} | {s['distinct_2']:.2f} | {s['s_per_token'] * 1000:.1f} ms "
        f"| {s['time_ratio_to_greedy']:.2f} | {s['cpu_s_per_token'] * 1000:.1f} ms | {s['cpu_ratio_to_greedy']:.2f} |\n"
        for s in summary)


def evaluate_sentiment(model_dir: Union[str, os.PathLike], out: Union[str, os.PathLike],
                       config: SentimentEvalConfig | None = None, prompts: Union[str, os.PathLike, None] = None,
                       force: bool = False, progress: bool = True) -> List[dict]:
    """Run every method on the first ``config.n`` prompts; write generations.csv, summary.{json,md} to ``out``."""
    from meav_merge.io.checkpoint import atomic_output_dir
    from meav_merge.resources import data_dir

    cfg = config or SentimentEvalConfig()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to overwrite)")
    prompts_path = Path(prompts) if prompts is not None else data_dir() / DEFAULT_PROMPTS
    openings = read_openings(prompts_path)[: cfg.n]
    model, tokenizer = load_causal_lm(model_dir)
    anchors: Anchors = manual_anchors(cfg.anchors, tokenizer)
    methods = cfg.selected_methods
    steering = {f"awot_{m}": AWOTSteering(model, anchors, AWOTConfig(cfg.alpha, cfg.steps, cfg.penalty, m))
                for m in ("iterative", "closed_form")}
    # One untimed call first: the first generate() pays one-off setup costs.
    generate(model, tokenizer, [format_prompt(tokenizer, op["text"], None, cfg.prompt_format)
                                for op in openings[: cfg.batch_size]], 2)
    rows = []
    batches = [openings[i: i + cfg.batch_size] for i in range(0, len(openings), cfg.batch_size)]
    for b, batch in enumerate(tqdm(batches, desc="sentiment eval (batches)", disable=not progress)):
        for m in methods:
            gen = _run_method(m, model, tokenizer, [op["text"] for op in batch], cfg, steering, cfg.seed + b)
            total = max(1, sum(gen.counts))
            for op, text, n_tok in zip(batch, gen.texts, gen.counts):
                # A batch's time is shared out by tokens, so sums over rows stay exact.
                rows.append({"id": op["id"], "method": m, "reward": vader_reward(text), "tokens": n_tok,
                             "seconds": gen.seconds * n_tok / total, "cpu_seconds": gen.cpu_seconds * n_tok / total,
                             "text": text})
    summary = summarize(rows, methods)
    meta = {"model": str(model_dir), "prompts": str(prompts_path), "config": asdict(cfg),
            "prompt_template": BASE_PROMPT, "anchors": anchors.to_json(), "torch_threads": torch.get_num_threads(),
            "summary": summary}
    with atomic_output_dir(out, force=force) as tmp:
        write_rows_csv(rows, tmp / "generations.csv")
        write_rows_csv(summary, tmp / "summary.csv")
        (tmp / "summary.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        (tmp / "summary.md").write_text(
            f"AWOT controlled sentiment generation: {model_dir}, {len(openings)} prompts, {cfg.prompt_format} format, "
            f"max {cfg.max_new_tokens} new tokens, batch size {cfg.batch_size}, α={cfg.alpha}, n={cfg.steps}, λ={cfg.penalty}, "
            f"anchors '{cfg.anchors}'.\n\n" + markdown_table(summary))
    return summary


# --- helpfulness / harmlessness: preference accuracy with and without AWOT ---------------------------

def evaluate_hh(model_dir: Union[str, os.PathLike], aligned_dir: Union[str, os.PathLike],
                data: Union[str, os.PathLike], config: AWOTConfig | None = None, top_k: int = 10,
                system: Optional[str] = None, progress: bool = True, domain: Optional[str] = None) -> dict:
    """Automatic anchors (train split, aligned vs ``model_dir``), then test-split preference accuracy ± AWOT.

    ``domain`` picks one domain of a data folder (or file); None: all of ``data``'s records.

    Paper Sec. 4.2: α = 0.5, n = 60, K = 10. Accuracy is MEAV Eq. 4 (the response with
    the highest mean token log-probability wins), computed by ``meav_merge.evaluation.scoring``
    with the AWOT hook active, so every response token is scored under the steered model.
    """
    from meav_merge.awot import automatic_anchors, awot_steering
    from meav_merge.data.schema import load_records
    from meav_merge.evaluation.scoring import mean_logprobs, prepare, preference_accuracy

    config = config or AWOTConfig(alpha=0.5, steps=60)
    train = load_records(data, domain, split="train")
    test = load_records(data, domain, split="test")
    levels = test[0].levels
    mixed = [r for r in test if r.levels != levels]
    if mixed:
        raise EvalInputError(f"{mixed[0].source}: levels {mixed[0].levels} differ from {levels}; "
                             "evaluate one domain at a time")
    model, tokenizer = load_causal_lm(model_dir)
    aligned, _ = load_causal_lm(aligned_dir)
    anchors = automatic_anchors(aligned, model, tokenizer, train, top_k=top_k, system=system, progress=progress,
                                source=f"auto: {aligned_dir} vs {model_dir} on {data} (train, {len(train)} pairs)")
    del aligned
    prepared = prepare(tokenizer, test, system=system)
    plain = mean_logprobs(model, tokenizer, prepared, progress=progress, desc="score")
    with awot_steering(model, anchors, config):
        steered = mean_logprobs(model, tokenizer, prepared, progress=progress, desc="score (AWOT)")

    def margin(scores):
        return sum(s[0] - s[-1] for s in scores) / len(scores)

    return {"model": str(model_dir), "aligned": str(aligned_dir), "data": str(data), "n_test": len(test),
            "levels": list(levels), "awot": asdict(config), "top_k": top_k, "anchors": anchors.to_json(),
            "accuracy": preference_accuracy(plain, levels), "accuracy_awot": preference_accuracy(steered, levels),
            "mean_margin": margin(plain), "mean_margin_awot": margin(steered),
            "scores": plain, "scores_awot": steered}
