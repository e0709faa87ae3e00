"""Policies: any Hugging Face causal LM (hub id, local directory, GGUF file) or the tiny built-in model.

The tiny model is a real `LlamaForCausalLM` with a character-level `PreTrainedTokenizerFast`, so it saves and
loads like any model directory and runs on every sampler backend (head dimension 64 suits vLLM's CPU attention).

A LoRA adapter (`learner.lora`) is added with transformers' own adapter support (peft underneath), so the policy
stays its model class and forward; the adapted layers keep the base weight as `<layer>.base_layer.weight`, which
`base_weights` maps back to the base model's names for whatever loads the base (vLLM, servers, checkpoints).
A saved adapter is a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`) with `base.json`,
which names the base it was trained on (a model name or folder, and the SHA-256 of its weights).
"""

from __future__ import annotations

import hashlib
import json
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load_file
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

from dash_core.config import LoraConfig, ModelConfig, TinyModelConfig
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
    weights (a snapshot taken earlier). Of an adapted model, its base (transformers would save the adapter only)."""
    if adapted(model):
        Path(path).mkdir(parents=True, exist_ok=True)
        save_tensors(state_dict or base_weights(model), Path(path) / "model.safetensors")
        model.config.save_pretrained(path)
        model.generation_config.save_pretrained(path)
    else:
        model.save_pretrained(path, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """`tensors` as one safetensors file, each written straight from its memory: safetensors' own writer took 3 to 5
    times as long for Qwen2.5-0.5B's 2.5 GB (the remote sampler's sync writes one per step). Tensors that share
    storage (tied embeddings) are each written whole."""
    items = [(name, tensor.detach().cpu().contiguous()) for name, tensor in tensors.items()]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in items:
        size = tensor.numel() * tensor.element_size()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"{name}: cannot write a {tensor.dtype} tensor to safetensors; convert the model to bfloat16 or float32"
            )
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        for _, tensor in items:
            file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return path


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


# -- LoRA adapters ---------------------------------------------------------------------------------------------
ADAPTER = "default"  # the adapter's name in the model: a policy has at most one
BASE_FILE = "base.json"


def add_lora(policy: PreTrainedModel, cfg: LoraConfig) -> None:
    """Give `policy` a LoRA adapter (initially the identity); only its weights stay trainable."""
    import peft

    policy.add_adapter(
        peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules),
        adapter_name=ADAPTER,
    )


def adapted(policy: PreTrainedModel) -> bool:
    return bool(getattr(policy, "_hf_peft_config_loaded", False))


def base_weights(policy: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The policy's weights without its adapter, in the base model's names."""
    weights = policy.state_dict()
    if not adapted(policy):
        return weights
    return {name.replace(".base_layer.", "."): tensor for name, tensor in weights.items() if ".lora_" not in name}


def load_base_weights(policy: PreTrainedModel, weights: dict[str, torch.Tensor]) -> None:
    """Load a base model's `weights` (its names) into `policy`, under its adapter if it has one."""
    if not adapted(policy):
        policy.load_state_dict(weights)
        return
    names = {name.replace(".base_layer.", "."): name for name in policy.state_dict() if ".lora_" not in name}
    if set(weights) != set(names):
        raise ValueError(f"base weights do not match the model: {sorted(set(weights) ^ set(names))[:5]}")
    policy.load_state_dict({names[name]: tensor for name, tensor in weights.items()}, strict=False)


def adapter_weights(policy: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The adapter's weights, in peft's file names."""
    return policy.get_adapter_state_dict(ADAPTER)


def base_digest(policy: PreTrainedModel) -> str:
    """SHA-256 of the base weights, by name: what an adapter was trained on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_weights(policy).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adapter(
    policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, base: dict[str, str],
    weights: dict[str, torch.Tensor] | None = None,
) -> str:  # fmt: skip
    """The adapter as a peft folder (its `weights`: a snapshot taken earlier, or the live ones), the tokenizer, and
    `base` ({"source": model name or folder, "sha256": base_digest}) as base.json."""
    write_adapter(policy, path, weights)
    (Path(path) / BASE_FILE).write_text(json.dumps(base))
    tokenizer.save_pretrained(path)
    return str(path)


def write_adapter(policy: PreTrainedModel, path: str | Path, weights: dict[str, torch.Tensor] | None = None) -> int:
    """The adapter as a peft folder, what vLLM loads as a LoRA; the bytes of its weights."""
    Path(path).mkdir(parents=True, exist_ok=True)
    policy.peft_config[ADAPTER].save_pretrained(str(path))
    tensors = save_tensors(
        weights if weights is not None else adapter_weights(policy), Path(path) / "adapter_model.safetensors"
    )
    return tensors.stat().st_size


def is_adapter(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / BASE_FILE).exists()


@contextmanager
def base_only(policy: PreTrainedModel) -> Iterator[None]:
    """Within it the policy is its base: the adapter off and frozen, every base weight trainable (a warm-up trains
    the base of a LoRA run); after it, only the adapter trains again."""
    if not adapted(policy):
        yield
        return
    policy.disable_adapters()
    for name, param in policy.named_parameters():
        param.requires_grad_(".lora_" not in name)
    try:
        yield
    finally:
        policy.enable_adapters()
        for name, param in policy.named_parameters():
            param.requires_grad_(".lora_" in name)


def load_adapter(policy: PreTrainedModel, path: str | Path) -> None:
    """Add the adapter saved at `path` to `policy`, which must be the base it names (checked by checksum)."""
    base = json.loads((Path(path) / BASE_FILE).read_text())
    found = base_digest(policy)
    if found != base["sha256"]:
        raise ValueError(
            f"the adapter at {path} was trained on {base['source']} (weights SHA-256 {base['sha256'][:12]}...), but "
            f"the base model loaded holds other weights ({found[:12]}...). Load the base it names: model.name, and "
            "the warm-up it was trained after"
        )
    import peft

    config = peft.LoraConfig.from_pretrained(str(path))
    policy.add_adapter(config, adapter_name=ADAPTER)
    peft.set_peft_model_state_dict(policy, load_file(Path(path) / "adapter_model.safetensors"), adapter_name=ADAPTER)


def load_policy(
    cfg: ModelConfig, seed: int = 0, path: str | None = None, storage_options: dict[str, Any] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy and its tokenizer; `path` (a saved directory) takes precedence over `cfg.name`. A saved adapter
    (either) loads the base its base.json names (a model name or folder; a store URL read with `storage_options`),
    then the adapter."""
    adapter = path or cfg.name
    if is_adapter(adapter):
        source = json.loads((Path(adapter) / BASE_FILE).read_text())["source"]
        base_cfg = cfg.model_copy(update={"name": source, "gguf_file": cfg.gguf_file if source == cfg.name else None})
        if "://" in source:  # a folder in a store (say, the run store's warm-up)
            with tempfile.TemporaryDirectory() as tmp:
                fs, folder = fsspec.core.url_to_fs(source, **(storage_options or {}))
                fs.get(folder.rstrip("/") + "/", tmp, recursive=True)
                policy, tokenizer = load_policy(base_cfg, seed, path=tmp)
        else:
            policy, tokenizer = load_policy(base_cfg, seed)
        load_adapter(policy, adapter)
        return policy, tokenizer
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
