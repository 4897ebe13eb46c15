"""AWOT: anchor-words tuning of the last hidden state at generation time (Yang et al., EMNLP 2025).

At every position the state h_t that feeds the LM head W is moved to increase the
value distinction (Eq. 3)

    φ_t = mean_{p∈P} ⟨h_t, e_p⟩ − mean_{n∈N} ⟨h_t, e_n⟩,     e = rows of W,

by n steps of gradient ascent (Eq. 5) with step size α on the objective of Eq. 4,
φ_t − λ‖h'_t − h_t‖², starting from h'_t = h_t:

    h'_{k+1} = h'_k + α (d − 2λ (h'_k − h_t)),     d = mean e_P − mean e_N = ∇φ.

Two implementations:

- ``iterative``: exactly that loop, with autograd on a copy of the state. Works for any
  state, including ``pre_norm`` (the residual stream before the final norm, where φ
  goes through the norm and is not linear).
- ``closed_form``: when the tuned state is the LM-head input, ∇φ = d is constant, so
  the n steps sum to h'_t = h_t + c·d with c = α Σ_{i<n} (1 − 2αλ)^i (= nα for λ = 0),
  and the logits move by the fixed vector c·W d. No autograd, one vector add.

Both are forward hooks, so plain ``model.generate()`` (KV cache: each new token is
steered), teacher-forced scoring and ``meav_merge.evaluation.scoring`` all see the steered model:

    with awot_steering(model, anchors, AWOTConfig(alpha=2.0, steps=60)):
        model.generate(...)

``AWOTLogitsProcessor`` is the closed form as a ``logits_processor=`` for generate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import LogitsProcessor

from meav_merge.awot.anchors import AnchorError, Anchors

__all__ = [
    "AWOTConfig", "AWOTConfigError", "AWOTSteering", "AWOTLogitsProcessor", "awot_steering", "step_coefficient",
    "anchor_direction", "anchor_logit_gap", "output_head", "final_norm",
]
METHODS = ("closed_form", "iterative")
STATES = ("lm_head_input", "pre_norm")
# Attribute names of the final norm on the decoder stack, across HF architectures.
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "norm_f", "final_layer_norm", "final_norm")
# Config keys of models whose logits are not W h + b (the logits processor would be wrong).
NONLINEAR_LOGIT_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class AWOTConfigError(ValueError):
    pass


@dataclass
class AWOTConfig:
    """Hyper-parameters of Eq. 4–5. Paper: sentiment α=2.0, n=60; HH-RLHF α=0.5, n=60; λ implicit (0)."""

    alpha: float = field(default=2.0, metadata={"help": "step size α", "minimum": 0})
    steps: int = field(default=60, metadata={"help": "ascent steps n", "minimum": 0})
    penalty: float = field(default=0.0, metadata={"help": "λ of the L2 penalty on the change h' − h", "minimum": 0})
    method: str = field(default="closed_form", metadata={
        "help": "closed_form (one vector add) or iterative (autograd; the command line picks it for pre_norm)",
        "choices": METHODS})
    state: str = field(default="lm_head_input", metadata={
        "help": "the state to tune: the LM-head input, or the residual stream before the final norm",
        "choices": STATES})

    def __post_init__(self):
        if self.method not in METHODS:
            raise AWOTConfigError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if self.state not in STATES:
            raise AWOTConfigError(f"state must be one of {', '.join(STATES)}, not '{self.state}'")
        if self.state == "pre_norm" and self.method == "closed_form":
            raise AWOTConfigError("state 'pre_norm' requires method 'iterative': through the final norm φ is not "
                                  "linear, so the closed form would not be the same update")
        from meav_merge.coefficients import CoefficientError, check_number

        try:  # NaN passes every comparison below and steers nothing, silently
            check_number(self.steps, "steps", integer=True, minimum=0)
            check_number(self.alpha, "alpha", minimum=0)
            check_number(self.penalty, "penalty", minimum=0)
        except CoefficientError as e:
            raise AWOTConfigError(str(e)) from None
        if not isinstance(self.steps, int):
            raise AWOTConfigError(f"steps must be an integer, not {self.steps!r}")
        if self.alpha * self.penalty > 1:
            # |1 − 2αλ| > 1: each step overshoots the penalized optimum by more than it corrects.
            raise AWOTConfigError(f"alpha·penalty = {self.alpha * self.penalty:g} > 1: the ascent diverges "
                                  "(lower alpha or penalty)")

    @property
    def is_noop(self) -> bool:
        return self.alpha == 0 or self.steps == 0

    @property
    def coefficient(self) -> float:
        return step_coefficient(self.alpha, self.steps, self.penalty)


def step_coefficient(alpha: float, steps: int, penalty: float = 0.0) -> float:
    """c with h'_n − h = c·d after n steps of h' += α(d − 2λ(h' − h)) from h' = h.

    The offset g_k = h'_k − h obeys g_{k+1} = r g_k + α d with r = 1 − 2αλ, so
    g_n = α d Σ_{i<n} r^i = α d (1 − r^n)/(1 − r) (= nα d when λ = 0).
    """
    r = 1.0 - 2.0 * alpha * penalty
    if r == 1.0:
        return alpha * steps
    return alpha * (1.0 - r ** steps) / (1.0 - r)


def output_head(model) -> torch.nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if head is None or weight is None or weight.dim() != 2:
        raise AWOTConfigError(f"{type(model).__name__}: no linear output head (get_output_embeddings()) to steer")
    return head


def final_norm(model) -> torch.nn.Module:
    """The norm whose output is the LM-head input (its input is the pre-norm residual state)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise AWOTConfigError(f"{type(model).__name__}: cannot find the final norm (looked for "
                          f"{', '.join(FINAL_NORM_NAMES)} on {type(decoder).__name__}); use state 'lm_head_input'")


def anchor_direction(model, anchors: Anchors) -> torch.Tensor:
    """d = mean of the LM-head rows of P − mean of those of N (= ∇φ at the LM-head input)."""
    weight = output_head(model).weight.detach()
    _check_ids(weight.shape[0], anchors)
    return weight[anchors.positive_ids].float().mean(0) - weight[anchors.negative_ids].float().mean(0)


def anchor_logit_gap(logits: torch.Tensor, anchors: Anchors) -> torch.Tensor:
    """mean logit of P − mean logit of N, over the last dimension (φ plus the bias difference)."""
    return logits[..., anchors.positive_ids].mean(-1) - logits[..., anchors.negative_ids].mean(-1)


def _check_ids(vocab: int, anchors: Anchors) -> None:
    bad = [t for t in anchors.positive_ids + anchors.negative_ids if not 0 <= t < vocab]
    if bad:
        raise AnchorError(f"{anchors.source}: token ids {bad[:5]} are outside the model's vocabulary of {vocab}")


class AWOTSteering:
    """The hook that tunes the state at every position; ``attach()``/``detach()`` or use ``awot_steering``."""

    def __init__(self, model, anchors: Anchors, config: AWOTConfig):
        self.model, self.anchors, self.config = model, anchors, config
        head = output_head(model)
        weight = head.weight.detach()
        _check_ids(weight.shape[0], anchors)
        # Copies: the weights stay frozen and outside every autograd graph we build. Made
        # outside inference mode, or the iterative path could not differentiate through them.
        with torch.inference_mode(False):
            self.positive_rows = weight[anchors.positive_ids].clone()
            self.negative_rows = weight[anchors.negative_ids].clone()
            self.direction = self.positive_rows.mean(0) - self.negative_rows.mean(0)
        self.module = head if config.state == "lm_head_input" else final_norm(model)
        self._handle = None

    # φ exactly as Eq. 3: the mean of the inner products with each anchor row.
    def value_distinction(self, hidden: torch.Tensor) -> torch.Tensor:
        pos = self.positive_rows.to(hidden.device, hidden.dtype)
        neg = self.negative_rows.to(hidden.device, hidden.dtype)
        return (hidden @ pos.T).mean(-1) - (hidden @ neg.T).mean(-1)

    def tune(self, state: torch.Tensor) -> torch.Tensor:
        """The steered state, for every position of ``state`` ([..., D])."""
        cfg = self.config
        if cfg.is_noop:
            return state
        if cfg.method == "closed_form":
            return state + cfg.coefficient * self.direction.to(state.device, state.dtype)
        to_hidden = (lambda x: x) if cfg.state == "lm_head_input" else self.module.forward  # .forward: no hook recursion
        return self._ascend(state, to_hidden)

    def _ascend(self, state: torch.Tensor, to_hidden) -> torch.Tensor:
        cfg = self.config
        # generate() runs under no_grad (and callers may use inference_mode): re-enable autograd locally.
        with torch.inference_mode(False), torch.enable_grad():
            origin = state.detach().clone()
            x = origin.clone().requires_grad_(True)
            for _ in range(cfg.steps):
                # Eq. 4 sums over positions; each position's gradient depends on its own state only.
                objective = self.value_distinction(to_hidden(x)).sum()
                if cfg.penalty:
                    objective = objective - cfg.penalty * (x - origin).pow(2).sum()
                (grad,) = torch.autograd.grad(objective, x)
                x = (x + cfg.alpha * grad).detach().requires_grad_(True)
            offset = (x - origin).detach()
        # Added to the caller's tensor, so a graph through the model (if any) is kept, as in the closed form.
        return state + offset

    def _pre_hook(self, module, args, kwargs):
        if self.config.is_noop:  # made a no-op after attach()
            return None
        if args:
            return (self.tune(args[0]),) + tuple(args[1:]), kwargs
        key = next(iter(kwargs))  # e.g. input= / hidden_states=
        return args, {**kwargs, key: self.tune(kwargs[key])}

    def attach(self) -> "AWOTSteering":
        # A no-op steering registers nothing: the model runs exactly as unsteered, bit for bit
        # (a hooked LM head is also scored through the module, not in vocabulary slices).
        if self._handle is None and not self.config.is_noop:
            self._handle = self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def predicted_gap_shift(self) -> float:
        """Closed form at the LM-head input: the P−N logit gap grows by c·‖d‖² at every position."""
        if self.config.state != "lm_head_input":
            raise AWOTConfigError("the gap shift is only known in closed form for state 'lm_head_input'")
        return self.config.coefficient * float(self.direction.double().pow(2).sum())


@contextlib.contextmanager
def awot_steering(model, anchors: Anchors, config: AWOTConfig | None = None) -> Iterator[AWOTSteering]:
    """Steer every forward pass of ``model`` inside the block (generate, scoring, plain calls)."""
    steering = AWOTSteering(model, anchors, config or AWOTConfig()).attach()
    try:
        yield steering
    finally:
        steering.detach()


class AWOTLogitsProcessor(LogitsProcessor):
    """Closed-form AWOT for ``generate(logits_processor=[...])``: scores += c·W d.

    Equal to ``awot_steering`` with method ``closed_form`` for models whose logits are
    W h (+ b). generate() runs its own processors (e.g. repetition_penalty) before the
    ones passed in, so with a repetition penalty the two orders differ; use the hook then.
    """

    def __init__(self, model, anchors: Anchors, config: AWOTConfig | None = None):
        config = config or AWOTConfig()
        if config.state != "lm_head_input":
            raise AWOTConfigError("the logits processor is the closed form at the LM-head input; "
                                  f"state '{config.state}' needs the hook (awot_steering)")
        cfg = getattr(model, "config", None)
        for key in NONLINEAR_LOGIT_KEYS:
            if getattr(cfg, key, None) not in (None, 1.0):
                raise AWOTConfigError(f"{type(model).__name__}: logits are not linear in the hidden state "
                                      f"({key}={getattr(cfg, key)}); use awot_steering instead")
        weight = output_head(model).weight.detach()
        direction = anchor_direction(model, anchors)
        # W d in float64, then float32: the shift is added to float32 scores.
        self.shift = (config.coefficient * (weight.double() @ direction.double())).float()
        if config.is_noop:
            self.shift = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.shift is None:
            return scores
        shift = self.shift.to(scores.device, scores.dtype)
        return scores + shift
