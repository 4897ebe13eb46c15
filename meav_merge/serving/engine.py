"""The model side of ``meav serve``: one base model, dense deltas swapped in per setting.

Every vector is held as float32 deltas of the tensors it changes (a compressed vector
as B @ A). ``set_setting`` writes θ = θ_base + Σ λ·v into just those tensors, from a
float32 copy of their base values, so it never accumulates rounding and costs one
pass over the changed tensors (the top layers, for a CPU-preset vector). Only the
scheduler's single worker thread calls into an Engine, which is what keeps requests
with different settings from ever seeing each other's weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from meav_merge.serving.settings import Setting
from meav_merge.vectors.alignment_vector import AlignmentVector, check_vector_against, model_tensors

logger = logging.getLogger(__name__)


def _cache_arg() -> str:
    import inspect

    from transformers import LlamaForCausalLM

    # transformers 5.x renamed past_key_values to cache (the old name warns)
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_ARG = _cache_arg()


def _cache(out):
    return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


@dataclass
class Sequence_:
    """One prompt to complete: token ids and what to return."""

    ids: List[int]
    max_tokens: int = 16
    logprobs: Optional[int] = None  # top-k count, or None
    echo: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: Optional[int] = None


@dataclass
class Result:
    tokens: List[int]  # echoed prompt (if echo) + generated
    generated: List[int]
    token_logprobs: List[Optional[float]] = field(default_factory=list)
    top_logprobs: List[Optional[Dict[int, float]]] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0


class Engine:
    def __init__(self, model_dir: str, vectors: Dict[str, str], *, dtype: str = "float32",
                 device: str = "cpu", transfer: bool = False, max_batch_tokens: int = 2048):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        self.device = torch.device(device)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_batch_tokens = max_batch_tokens
        self.deltas: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, path in vectors.items():
            vec = AlignmentVector.load(path)
            check_vector_against(vec, model_dir, transfer=transfer, label=f"vector {name} ({path})")
            self.deltas[name] = {n: vec.read(n).to(self.device, torch.float32) for n in vec.keys()}
        changed = sorted({n for d in self.deltas.values() for n in d})
        self.params = model_tensors(self.model, changed)
        self.base = {n: self.params[n].detach().to(torch.float32).clone() for n in changed}
        self.setting: Setting = ()
        self.switches = 0
        self.switch_seconds = 0.0

    # --- weights -------------------------------------------------------------------------
    @torch.no_grad()
    def set_setting(self, setting: Setting) -> None:
        if setting == self.setting:
            return
        t0 = time.perf_counter()
        touched = set()
        for name, _ in self.setting + setting:
            touched.update(self.deltas[name])
        for n in sorted(touched):
            acc = self.base[n].clone()
            for name, lam in setting:
                d = self.deltas[name].get(n)
                if d is not None:
                    acc.add_(d, alpha=lam)
            self.params[n].copy_(acc.to(self.params[n].dtype))
        self.setting = setting
        self.switches += 1
        self.switch_seconds += time.perf_counter() - t0

    # --- scoring ------------------------------------------------------------------------------
    @staticmethod
    def _positions(logits: torch.Tensor, ids: List[int], k: Optional[int]):
        """Log-prob of each next prompt token (None for the first) and the top-k at each."""
        logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
        target = torch.tensor(ids[1:], device=logp.device)
        chosen = logp[:-1].gather(1, target[:, None])[:, 0].tolist() if len(ids) > 1 else []
        tops: List[Optional[Dict[int, float]]] = [None]
        if k:
            v, i = logp[:-1].topk(k, dim=-1)
            tops += [dict(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
        else:
            tops += [None] * (len(ids) - 1)
        return [None] + chosen, tops, logp[-1]

    @torch.no_grad()
    def run(self, seqs: Sequence[Sequence_]) -> List[Result]:
        """Complete every sequence at the current setting. Prompts that need at most one
        new token (lm-eval's scoring requests) go through padded batches."""
        results: List[Optional[Result]] = [None] * len(seqs)
        short = [i for i, s in enumerate(seqs) if s.max_tokens <= 1]
        for batch in self._batches(short, seqs):
            self._score_batch(batch, seqs, results)
        for i, s in enumerate(seqs):
            if results[i] is None:
                results[i] = self._generate(s)
        return results

    def _batches(self, idx: List[int], seqs):
        idx = sorted(idx, key=lambda i: len(seqs[i].ids))
        batch: List[int] = []
        for i in idx:
            if batch and (len(batch) + 1) * len(seqs[i].ids) > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _score_batch(self, batch: List[int], seqs, results) -> None:
        width = max(len(seqs[i].ids) for i in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(seqs[i].ids)] = torch.tensor(seqs[i].ids)
            mask[row, : len(seqs[i].ids)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        for row, i in enumerate(batch):
            s = seqs[i]
            chosen, tops, last = self._positions(logits[row, : len(s.ids)], s.ids, s.logprobs)
            results[i] = self._finish(s, chosen, tops, [last] if s.max_tokens == 1 else [], None)

    def _pick(self, logp: torch.Tensor, s: Sequence_, gen: Optional[torch.Generator]) -> int:
        if s.temperature <= 0:
            return int(logp.argmax())
        probs = torch.softmax(logp / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = torch.cumsum(sp, 0) - sp < s.top_p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))

    def _generate(self, s: Sequence_) -> Result:
        out = self.model(input_ids=torch.tensor([s.ids], device=self.device), use_cache=True)
        chosen, tops, last = self._positions(out.logits[0], s.ids, s.logprobs)
        steps, past = [last], _cache(out)
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        return self._finish(s, chosen, tops, steps, (past, gen))

    def _finish(self, s: Sequence_, chosen, tops, first: list, state) -> Result:
        """Pick new tokens from ``first`` (next-token log-probs) and, with ``state``, go on
        decoding with the KV cache until max_tokens, EOS or a stop string."""
        res = Result(tokens=list(s.ids) if s.echo else [], generated=[], prompt_tokens=len(s.ids))
        if s.echo:
            res.token_logprobs, res.top_logprobs = list(chosen), list(tops)
        eos = self.tokenizer.eos_token_id
        logp = first[0] if first else None
        past, gen = state if state else (None, None)
        while logp is not None and len(res.generated) < s.max_tokens:
            tok = self._pick(logp, s, gen)
            res.generated.append(tok)
            res.tokens.append(tok)
            res.token_logprobs.append(float(logp[tok]))
            if s.logprobs:
                v, i = logp.topk(s.logprobs)
                res.top_logprobs.append(dict(zip(i.tolist(), v.tolist())))
            else:
                res.top_logprobs.append(None)
            if tok == eos:
                res.finish_reason = "stop"
                break
            if s.stop and any(x in self.tokenizer.decode(res.generated) for x in s.stop):
                res.finish_reason = "stop"
                break
            if past is None or len(res.generated) >= s.max_tokens:
                break
            out = self.model(input_ids=torch.tensor([[tok]], device=self.device), use_cache=True,
                             **{_CACHE_ARG: past})
            past, logp = _cache(out), torch.log_softmax(out.logits[0, -1].to(torch.float32), -1)
        return res
