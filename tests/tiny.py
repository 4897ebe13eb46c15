"""Tiny random causal LMs and an offline tokenizer for fast tests (hidden 64, 2 layers)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "I have a question about my blood pressure medication and my doctor.",
    "Please consult a qualified professional about your tax return and retirement account.",
    "The landlord kept my security deposit after I moved out in March.",
    "I'm sorry, I can't help with that; please see an expert.",
    "Take 500 mg twice a day with food for ten days; check your kidney function.",
    "Generally, it is a good idea to save an emergency fund of three to six months.",
    "the of and to in is you that it for on with as are be this have or at by",
] * 4


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_model(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 2, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=tie,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # random norms too, so vectors touch every tensor kind
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save(model, tokenizer, path: Path) -> Path:
    path = Path(path)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of ``model`` with small random changes to every weight (a fake 'aligned' model)."""
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def top_layer_delta(model, seed: int, scale: float) -> dict:
    """Random changes to the top layer and the final norm only, zeros elsewhere: the shape of a
    CPU-preset vector (the tied LM head is not a separate tensor on disk, so it is left out)."""
    top_prefix = f"model.layers.{model.config.num_hidden_layers - 1}."
    g = torch.Generator().manual_seed(seed)
    delta = {}
    for n, p in model.state_dict().items():
        if n == "lm_head.weight":
            continue
        top = n.startswith(top_prefix) or n == "model.norm.weight"
        delta[n] = scale * torch.randn(p.shape, generator=g) if top else torch.zeros_like(p)
    return delta
