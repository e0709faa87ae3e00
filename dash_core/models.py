"""Policies: any Hugging Face causal LM (hub id, local directory, GGUF file) or the tiny built-in model.

The tiny model is a real `LlamaForCausalLM` with a character-level `PreTrainedTokenizerFast`, so it saves and
loads like any model directory and runs on every sampler backend (head dimension 64 suits vLLM's CPU attention).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from dash_core.config import ModelConfig, TinyModelConfig
from dash_core.model_zoo import resolve
from dash_core.team import local_device

TINY = "tiny"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHARACTERS = string.printable[:95] + "\n"  # printable ASCII (no \t\r\x0b\x0c) and newline


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; special tokens first so pad is id 0."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *CHARACTERS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def resolve_device(name: str) -> torch.device:
    """`auto`: a GPU when there is one; each learner process of a team takes its own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return local_device(torch.device(name))


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, state_dict: dict | None = None
) -> str:
    """A model directory that `load_policy`, vLLM and any HF tool can load; `state_dict` replaces the model's own
    weights (a snapshot taken earlier)."""
    model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    return str(path)


def load_policy(cfg: ModelConfig, seed: int = 0, path: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy and its tokenizer; `path` (a saved directory) takes precedence over `cfg.name`."""
    source = path or resolve(cfg.name)
    dtype = getattr(torch, cfg.dtype)
    if source == TINY:
        tokenizer = char_tokenizer()
        model = tiny_model(cfg.tiny, tokenizer, seed).to(dtype)
    else:
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not path else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except OSError as exc:
            raise OSError(
                f"could not load model {source!r}: {exc}\n"
                "Pass a local model directory, or a hub id on a machine that reaches the Hugging Face hub "
                "(model.name=tiny runs the built-in model offline)."
            ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(resolve_device(cfg.device)), tokenizer
