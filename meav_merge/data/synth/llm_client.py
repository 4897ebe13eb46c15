"""A chat-completion client: one interface, two backends.

``OpenAICompatibleBackend`` is the ``openai`` SDK pointed at any ``base_url`` (OpenAI,
vLLM, llama.cpp's server, TGI, LiteLLM, Ollama's /v1 and the like). The SDK retries
connection errors, timeouts, HTTP 408/409/429 and 5xx with exponential backoff and
jitter, honouring ``Retry-After``; any other HTTP error means the request itself is
wrong (bad model name, bad key), so it fails at once. ``TransformersBackend`` runs a
local Hugging Face causal LM on CPU. Both return a ``ChatResult``; callers need nothing else.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional


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


def _server_message(body: str) -> str:
    """The error text an OpenAI-style server put in its body, on one line."""
    text = body.strip()
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
    """``POST {base_url}/chat/completions`` through the ``openai`` SDK; ``base_url`` usually ends in ``/v1``."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 5):
        import openai

        if not base_url.startswith(("http://", "https://")):
            raise LLMError(f"base URL must start with http:// or https://, not {base_url!r}")
        if not model:
            raise LLMError("no model name given for the OpenAI-compatible endpoint")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries = max_retries
        key = os.environ.get(api_key_env) if api_key_env else None
        # Local servers usually need no key: then no Authorization header at all (the SDK
        # insists on a key unless the header is explicitly omitted per request).
        self._headers = {} if key else {"Authorization": openai.Omit()}
        self._client = openai.OpenAI(base_url=base_url, api_key=key or "unused", timeout=timeout,
                                     max_retries=max_retries)

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend({self.url!r}, model={self.model!r})"

    def complete(self, messages: List[dict], *, max_tokens: int = 512, temperature: float = 0.7,
                 seed: Optional[int] = None) -> ChatResult:
        import openai

        extra = {} if seed is None else {"seed": seed}
        try:
            reply = self._client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                         temperature=temperature, extra_headers=self._headers,
                                                         **extra)
        except openai.APIStatusError as e:
            detail = _server_message(e.response.text) or "no details"
            if e.status_code in (408, 409, 429) or e.status_code >= 500:
                raise self._gave_up(f"HTTP {e.status_code}: {detail}") from None
            raise LLMRequestError(f"POST {self.url}: HTTP {e.status_code} {e.response.reason_phrase}: {detail}",
                                  e.status_code) from None
        except openai.APITimeoutError:
            raise self._gave_up("no answer in time") from None
        except openai.APIConnectionError as e:
            raise self._gave_up(f"connection failed: {e.__cause__ or e}") from None
        try:
            choice = reply.choices[0]
            return ChatResult(text=choice.message.content or "", finish_reason=str(choice.finish_reason or "stop"))
        except (AttributeError, IndexError, TypeError):
            raise LLMError(f"POST {self.url}: not an OpenAI chat-completions answer: {str(reply)[:200]!r}") from None

    def _gave_up(self, last: str) -> LLMUnavailableError:
        return LLMUnavailableError(f"POST {self.url}: gave up after {self.max_retries + 1} attempts ({last})")


class TransformersBackend:
    """A local causal LM with a chat template, float32 on CPU (safetensors weights only)."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from meav_merge.evaluation.generation import pad_token_id, stop_token_ids

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
        self.eos_ids = stop_token_ids(self.model, self.tokenizer)
        self.pad_id = pad_token_id(self.tokenizer, self.eos_ids)
        # One generation at a time: torch already uses every core for one, and the
        # seeded RNG in complete() must not be shared between threads.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TransformersBackend({self.model_dir!r})"

    def complete(self, messages: List[dict], *, max_tokens: int = 512, temperature: float = 0.7,
                 seed: Optional[int] = None) -> ChatResult:
        import torch
        from transformers import GenerationConfig

        from meav_merge.evaluation.scoring import chat_prompt

        sampling = temperature > 0
        # A fresh config, so a checkpoint's own sampling defaults (top_p, ...) cannot leak in.
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=sampling,
                                  temperature=temperature if sampling else None, top_k=0 if sampling else None,
                                  top_p=1.0 if sampling else None, eos_token_id=self.eos_ids or None,
                                  pad_token_id=self.pad_id)
        # The tokenizer is inside the lock too: a fast tokenizer is not safe to share between threads.
        with self._lock, torch.random.fork_rng(devices=[]), torch.no_grad():
            enc = self.tokenizer(chat_prompt(self.tokenizer, messages), return_tensors="pt", add_special_tokens=False)
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(**{k: v.to(self.device) for k, v in enc.items()}, generation_config=config)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        hit_eos = bool(new) and new[-1] in self.eos_ids
        finish = "length" if len(new) >= max_tokens and not hit_eos else "stop"
        return ChatResult(text=text, finish_reason=finish)
