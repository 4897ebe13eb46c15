"""The OpenAI-compatible HTTP API of ``meav serve`` (FastAPI).

``/v1/completions`` takes what lm-eval's ``local-completions`` backend sends: a prompt
as text, a list of texts, token ids or a list of token-id lists; ``echo`` and
``logprobs`` return the prompt tokens' log-probs (None for the first token) and the
top-k at each position, as the legacy OpenAI API did. ``/v1/chat/completions`` applies
the model's chat template. The setting comes from ``model`` and the ``meav`` field
(see settings.py). Errors are OpenAI-shaped JSON with ``param`` naming the field.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any, List

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from meav_merge.coefficients import is_finite_number
from meav_merge.serving.engine import Result, Sequence_
from meav_merge.serving.scheduler import Scheduler
from meav_merge.serving.settings import Registry, SettingError

logger = logging.getLogger(__name__)


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


async def _body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SettingError("body", f"body: malformed JSON ({e})") from None
    if not isinstance(body, dict):
        raise SettingError("body", "body: must be a JSON object")
    return body


def _int(body: dict, key: str, default, lo: int, hi: int | None = None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise SettingError(key, f"{key}: must be an integer in [{lo}, {hi if hi is not None else '∞'}], got {v!r}")
    return v


def _float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if not is_finite_number(v) or not lo <= v <= hi:
        raise SettingError(key, f"{key}: must be a finite number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _stops(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise SettingError("stop", "stop: must be a string or a list of non-empty strings")
    return stop


def _prompts(prompt, tokenizer, vocab: int) -> List[List[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise SettingError("prompt", "prompt: must be text, token ids, or a non-empty list of either")
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = tokenizer(p, add_special_tokens=False).input_ids
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = p
            if any(t < 0 or t >= vocab for t in ids):
                raise SettingError("prompt", f"prompt: token id outside the vocabulary [0, {vocab})")
        else:
            raise SettingError("prompt", "prompt: each item must be text or a list of token ids")
        if not ids:
            raise SettingError("prompt", "prompt: empty prompt")
        out.append(list(ids))
    return out


def _sequences(body: dict, prompts: List[List[int]], max_context: int, *, default_max: int) -> List[Sequence_]:
    n = _int(body, "n", 1, 1, 1)
    assert n == 1
    max_tokens = _int(body, "max_tokens", default_max, 0)
    if "max_completion_tokens" in body:
        max_tokens = _int(body, "max_completion_tokens", default_max, 0)
    logprobs = body.get("logprobs")
    if isinstance(logprobs, bool):  # chat API: logprobs: true, top_logprobs: k
        logprobs = _int(body, "top_logprobs", 1, 0, 20) if logprobs else None
    elif logprobs is not None:
        logprobs = _int(body, "logprobs", None, 0, 20)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise SettingError("echo", f"echo: must be true or false, got {echo!r}")
    seed = _int(body, "seed", None, 0)
    seqs = []
    for ids in prompts:
        if len(ids) + max_tokens > max_context:
            raise SettingError("prompt", f"prompt: {len(ids)} tokens + max_tokens {max_tokens} exceed the model's "
                                         f"context of {max_context} tokens")
        seqs.append(Sequence_(ids=ids, max_tokens=max_tokens, logprobs=logprobs, echo=echo,
                              temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
                              top_p=_float(body, "top_p", 1.0, 0.0, 1.0), stop=_stops(body), seed=seed))
    return seqs


def _cut_stop(text: str, stops: List[str]) -> str:
    cuts = [text.index(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def _logprobs_json(res: Result, tokenizer) -> dict:
    strings = [tokenizer.decode([t]) for t in res.tokens]
    offsets, pos = [], 0
    for s in strings:
        offsets.append(pos)
        pos += len(s)
    tops = [None if t is None else {tokenizer.decode([k]): v for k, v in t.items()} for t in res.top_logprobs]
    return {"tokens": strings, "token_logprobs": res.token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def build_app(registry: Registry, scheduler: Scheduler) -> FastAPI:
    # One function over ~60 lines on purpose: FastAPI routes are closures over the registry,
    # scheduler and tokenizer, declared where the app is built (as FastAPI's own examples do).
    engine = scheduler.engine
    tok = engine.tokenizer
    vocab = int(engine.model.get_input_embeddings().weight.shape[0])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn has let in-flight requests finish (SIGTERM/SIGINT); now end the worker.
        scheduler.stop()
        logger.info("meav serve: worker stopped")

    app = FastAPI(title="meav serve", lifespan=lifespan)

    @app.exception_handler(SettingError)
    async def _setting_error(request, exc: SettingError):
        return _error(exc.status, str(exc), exc.field)

    @app.get("/v1/models")
    async def models():
        data = [{"id": "base", "object": "model", "owned_by": "meav", "meav": {}}]
        data += [{"id": name, "object": "model", "owned_by": "meav", "meav": dict(s)}
                 for name, s in sorted(registry.presets.items())]
        data += [{"id": f"base+{name}=1", "object": "model", "owned_by": "meav", "meav": {name: 1.0},
                  "meav_vector": path} for name, path in sorted(registry.vectors.items())]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        setting = registry.resolve(body.get("model"), body.get("meav"))
        seqs = _sequences(body, _prompts(body.get("prompt"), tok, vocab), engine.max_context, default_max=16)
        results = await scheduler.submit(setting, seqs)
        choices = []
        for i, (s, r) in enumerate(zip(seqs, results)):
            text = _cut_stop(tok.decode(r.generated, skip_special_tokens=True), list(s.stop))
            if s.echo:
                text = tok.decode(s.ids) + text
            choices.append({"index": i, "text": text, "finish_reason": r.finish_reason,
                            "logprobs": _logprobs_json(r, tok) if s.logprobs is not None else None})
        return _envelope("text_completion", body, choices, results)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request)
        setting = registry.resolve(body.get("model"), body.get("meav"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise SettingError("messages", "messages: must be a non-empty list of {role, content} strings")
        ids = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                      add_generation_prompt=True, tokenize=False)
        prompt = tok(ids, add_special_tokens=False).input_ids
        body = {k: v for k, v in body.items() if k != "echo"}
        (seq,) = _sequences(body, [prompt], engine.max_context, default_max=256)
        (r,) = await scheduler.submit(setting, [seq])
        text = _cut_stop(tok.decode(r.generated, skip_special_tokens=True), list(seq.stop))
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": r.finish_reason}
        if seq.logprobs is not None:
            choice["logprobs"] = {"content": [
                {"token": tok.decode([t]), "logprob": lp,
                 "top_logprobs": [{"token": tok.decode([k]), "logprob": v} for k, v in (top or {}).items()]}
                for t, lp, top in zip(r.generated, r.token_logprobs, r.top_logprobs)]}
        return _envelope("chat.completion", body, [choice], [r])

    return app


def _envelope(kind: str, body: dict, choices: list, results: List[Result]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.generated) for r in results)
    return {"id": f"meav-{uuid.uuid4().hex[:16]}", "object": kind, "created": int(time.time()),
            "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}
