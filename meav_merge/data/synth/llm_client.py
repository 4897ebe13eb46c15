"""A minimal chat-completion client: one interface, two backends.

``OpenAICompatibleBackend`` speaks the OpenAI chat-completions protocol over plain
HTTP (standard library only), so it works with OpenAI, vLLM, llama.cpp's server,
TGI, LiteLLM, Ollama's /v1 and the like. ``TransformersBackend`` runs a local Hugging
Face causal LM on CPU. Both return a ``ChatResult``; callers need nothing else.

Transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with
exponential backoff and jitter, honouring ``Retry-After``; any other HTTP error means
the request itself is wrong (bad model name, bad key), so it fails at once.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

MAX_RETRY_AFTER_S = 300.0  # never sleep longer than this on a server's say-so


@dataclass
class ChatResult:
    text: str
    finish_reason: str  # "stop", "length", ...


class LLMError(ValueError):
    """The LLM endpoint could not give an answer; the message names the URL or model."""


class LLMRequestError(LLMError):
    """The server rejected the request (HTTP 4xx other than 429): retrying cannot help."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class LLMUnavailableError(LLMError):
    """Transient failures persisted through every retry."""


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: Optional[float] = None):
        super().__init__(reason)
        self.retry_after = retry_after


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(body: bytes) -> str:
    """The error text an OpenAI-style server put in its body, on one line."""
    text = body.decode("utf-8", "replace").strip()
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(err, str):
            text = err
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:300]


class OpenAICompatibleBackend:
    """POST ``{base_url}/chat/completions``; ``base_url`` usually ends in ``/v1``."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 5, backoff: float = 1.0):
        if not base_url.startswith(("http://", "https://")):
            raise LLMError(f"base URL must start with http:// or https://, not {base_url!r}")
        if not model:
            raise LLMError("no model name given for the OpenAI-compatible endpoint")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._jitter = random.Random()

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend({self.url!r}, model={self.model!r})"

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:  # local servers usually need none
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, messages: List[dict], *, max_tokens: int = 512, temperature: float = 0.7,
                 seed: Optional[int] = None) -> ChatResult:
        payload = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            payload["seed"] = seed
        body = json.dumps(payload).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._post_once(body)
            except _Transient as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                delay = self.backoff * 2**attempt * self._jitter.uniform(0.5, 1.5)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, MAX_RETRY_AFTER_S))
                time.sleep(delay)
        raise LLMUnavailableError(f"POST {self.url}: gave up after {self.max_retries + 1} attempts ({last})")

    def _post_once(self, body: bytes) -> ChatResult:
        request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            try:
                detail = _server_message(e.read() if e.fp else b"")
            except (OSError, http.client.HTTPException):  # the error body itself was cut off
                detail = ""
            if e.code == 429 or e.code >= 500:
                raise _Transient(f"HTTP {e.code}: {detail}", _parse_retry_after(e.headers.get("Retry-After")))
            raise LLMRequestError(f"POST {self.url}: HTTP {e.code} {e.reason}: {detail or 'no details'}",
                                  e.code) from None
        except urllib.error.URLError as e:  # refused, DNS, timeout while connecting
            raise _Transient(f"connection failed: {e.reason}") from None
        except (TimeoutError, socket.timeout):
            raise _Transient(f"no answer within {self.timeout:g} s") from None
        except (ConnectionError, http.client.HTTPException) as e:  # dropped mid-answer
            raise _Transient(f"connection dropped: {type(e).__name__}") from None
        return self._parse(raw)

    def _parse(self, raw: bytes) -> ChatResult:
        try:
            choice = json.loads(raw)["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
            finish = choice.get("finish_reason") or "stop"
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            snippet = " ".join(raw.decode("utf-8", "replace").split())[:200]
            raise LLMError(f"POST {self.url}: not an OpenAI chat-completions answer: {snippet!r}") from None
        return ChatResult(text=text, finish_reason=str(finish))


class TransformersBackend:
    """A local causal LM with a chat template, float32 on CPU (safetensors weights only)."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not path.is_dir():
            raise LLMError(f"{path}: no such model directory")
        if not any(path.glob("*.safetensors")):
            raise LLMError(f"{path}: no *.safetensors weights (only safetensors are loaded)")
        self.model_dir = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32,
                                                          use_safetensors=True).to(device).eval()
        self.device = device
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        tok_eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        self.eos_ids = sorted(set(gen_eos + tok_eos))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            (self.eos_ids[0] if self.eos_ids else 0)
        # One generation at a time: torch already uses every core for one, and the
        # seeded RNG in complete() must not be shared between threads.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TransformersBackend({self.model_dir!r})"

    def _prompt(self, messages: List[dict]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # Base models without a template: a plain transcript.
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n\n".join(lines) + "\n\nAssistant:"

    def complete(self, messages: List[dict], *, max_tokens: int = 512, temperature: float = 0.7,
                 seed: Optional[int] = None) -> ChatResult:
        import torch
        from transformers import GenerationConfig

        sampling = temperature > 0
        # A fresh config, so a checkpoint's own sampling defaults (top_p, ...) cannot leak in.
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=sampling,
                                  temperature=temperature if sampling else None, top_k=0 if sampling else None,
                                  top_p=1.0 if sampling else None, eos_token_id=self.eos_ids or None,
                                  pad_token_id=self.pad_id)
        # The tokenizer is inside the lock too: a fast tokenizer is not safe to share between threads.
        with self._lock, torch.random.fork_rng(devices=[]), torch.no_grad():
            enc = self.tokenizer(self._prompt(messages), return_tensors="pt", add_special_tokens=False)
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**{k: v.to(self.device) for k, v in enc.items()}, generation_config=config)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        hit_eos = bool(new) and new[-1] in self.eos_ids
        finish = "length" if len(new) >= max_tokens and not hit_eos else "stop"
        return ChatResult(text=text, finish_reason=finish)
