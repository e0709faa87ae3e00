"""The remote backend: OpenAI-compatible vLLM servers, the batch sharded across them, weights synced through files.

Each server gets a contiguous shard of the prompts; the shards run concurrently and are put back in prompt order.
Weights go through `sync_dir`, a folder every server can read: the policy is written there as safetensors and each
server reloads it through the development endpoints (`VLLM_SERVER_DEV_MODE=1`, as `dash_core.serving` starts them).
A server that errors or exceeds `timeout_s` is dropped for the rest of the run and its work goes to the others,
so a lost worker costs time, not the run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.config import RemoteConfig
from dash_core.models import adapted, base_weights, save_tensors, write_adapter
from dash_core.samplers.base import Generation, Sampler, SamplingParams
from dash_core.samplers.vllm_backend import to_generation, vllm_request
from dash_core.serving import lora_server_args

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a failing server looks like from here: refused or reset connections, timeouts, error statuses, bad bodies.
SERVER_ERRORS = (httpx.HTTPError, ValueError, KeyError, TimeoutError)
WEIGHTS_PREFIX, ADAPTER_PREFIX = "weights-v", "adapter-v"


class NoServersLeftError(RuntimeError):
    """Every inference server failed or none was given; sampling cannot go on."""


def shard(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) cut into at most `parts` contiguous, nearly equal, non-empty pieces."""
    bounds = [start + (end - start) * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


def save_weights(policy: PreTrainedModel, path: Path) -> int:
    """Every tensor of the policy (of its base, if it has an adapter) in one safetensors file at `path`, written to a
    temporary folder then renamed, so a server never reads a half-written file; the file's bytes.

    `lm_head.weight` is kept even when tied to the embeddings (`save_pretrained` drops it, and vLLM's lm_head then
    keeps the old weights).
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    written = save_tensors(base_weights(policy), tmp / "model.safetensors").stat().st_size
    if path.exists():  # left by an earlier process of a resumed run
        shutil.rmtree(path)
    tmp.rename(path)
    return written


class RemoteSampler(Sampler):
    """Samples on the servers in `cfg.urls` plus any added with `add_servers`; `events` records the dropped ones."""

    def __init__(self, cfg: RemoteConfig, tokenizer: PreTrainedTokenizerBase, sync_dir: str):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.sync_dir = Path(sync_dir)
        self.client = httpx.Client(timeout=cfg.timeout_s)
        self.servers: list[str] = []  # the live ones
        self.events: list[dict[str, Any]] = []  # one per dropped server, for the run to log
        self.version = 0  # weight syncs so far; the servers report it as their weight version
        self.weights: Path | None = None  # the newest full weights the servers hold
        self.adapter: Path | None = None  # a LoRA run's newest adapter, which the servers sample with
        self._models: dict[str, str] = {}  # url -> served model name
        self.add_servers(cfg.urls)

    def add_servers(self, urls: list[str]) -> None:
        """Use more servers; after a sync, new ones load the current weights first (they start from older ones)."""
        new = [url.rstrip("/") for url in urls if url.rstrip("/") not in self.servers]
        self.servers += new
        if self.version and new:
            self._sync(new, self.weights, self.adapter)

    # -- sampling ----------------------------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[Generation]:
        done: dict[int, list[Generation]] = {}  # first prompt of a shard -> its generations
        pending = [(0, len(prompts))] if prompts else []
        while pending:
            servers = self._live()
            jobs = [(url, piece) for span in pending for url, piece in zip(servers, shard(*span, len(servers)))]
            outcomes = _parallel(
                [partial(self._complete, url, prompts[a:b], params, seeds and seeds[a:b]) for url, (a, b) in jobs]
            )
            pending = []
            for (url, (a, b)), outcome in zip(jobs, outcomes):
                if isinstance(outcome, Exception):
                    self._drop(url, f"sampling prompts {a}-{b - 1}", outcome)
                    pending.append((a, b))
                else:
                    done[a] = outcome
        return [g for start in sorted(done) for g in done[start]]

    def _complete(
        self, url: str, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None
    ) -> list[Generation]:
        """A shard on one server: one request, or with seeds one concurrent request per prompt (a request carries
        one seed), which the server batches as it would one request."""
        if seeds is None:
            return self._request(url, prompts, params)
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            parts = pool.map(lambda prompt, seed: self._request(url, [prompt], params, seed), prompts, seeds)
            return [g for part in parts for g in part]

    def _request(
        self, url: str, prompts: list[list[int]], params: SamplingParams, seed: int | None = None
    ) -> list[Generation]:
        sent, fields = vllm_request(prompts, params)
        model = self.adapter.name if self.adapter else self._model(url)  # an adapter is served under its own name
        body = {"model": model, "prompt": sent, "return_token_ids": True, **fields}
        if seed is not None:
            body["seed"] = seed
        # Choices come prompt-major (index = position); sorting keeps that true should a server reorder them.
        choices = sorted(self._json("POST", f"{url}/v1/completions", json=body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts) * params.n:
            raise ValueError(f"{len(choices)} completions for {len(prompts)} prompts x n={params.n}")
        return [
            to_generation(self.tokenizer, c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"])
            for c in choices
        ]

    def _model(self, url: str) -> str:
        if url not in self._models:
            self._models[url] = self._json("GET", f"{url}/v1/models")["data"][0]["id"]
        return self._models[url]

    # -- weight sync -------------------------------------------------------------------------------------------
    def load_weights(self, policy: PreTrainedModel, adapter_only: bool = False) -> None:
        """Write the weights as version `n + 1` (with `adapter_only`, a LoRA run's adapter alone) and return once
        every live server reports that version."""
        self.version += 1
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        self.synced_bytes = 0
        full = not (adapter_only and adapted(policy))
        if full:
            self.weights = self.sync_dir / f"{WEIGHTS_PREFIX}{self.version}"
            self.synced_bytes += save_weights(policy, self.weights)
        if adapted(policy):
            self.adapter = self.sync_dir / f"{ADAPTER_PREFIX}{self.version}"
            self.synced_bytes += write_adapter(policy, self.adapter)
        self._sync(list(self.servers), self.weights if full else None, self.adapter)
        self._live()
        for old in [*self.sync_dir.glob(f"{WEIGHTS_PREFIX}*"), *self.sync_dir.glob(f"{ADAPTER_PREFIX}*")]:
            if old not in (self.weights, self.adapter):
                shutil.rmtree(old, ignore_errors=True)

    def _sync(self, urls: list[str], weights: Path | None, adapter: Path | None) -> None:
        outcomes = _parallel([partial(self._sync_server, url, weights, adapter, str(self.version)) for url in urls])
        for url, outcome in zip(urls, outcomes):
            if isinstance(outcome, Exception):
                self._drop(url, f"weight sync to version {self.version}", outcome)

    def _sync_server(self, url: str, weights: Path | None, adapter: Path | None, version: str) -> None:
        """Full `weights` (if given) reloaded in place, then the `adapter` (if any) loaded under its own name and the
        one before it unloaded; the server then reports `version`."""
        deadline = time.monotonic() + self.cfg.timeout_s
        if weights is not None:
            self._json(
                "POST",
                f"{url}/collective_rpc",
                json={"method": "reload_weights", "kwargs": {"weights_path": str(weights)}},
            )
        if adapter is not None:
            self._load_adapter(url, adapter)
        # The reset is refused while blocks are held (e.g. by requests still running); it must happen, so retry.
        _poll(lambda: self._json("POST", f"{url}/reset_prefix_cache")["success"], deadline, "prefix cache reset")
        self._json("POST", f"{url}/update_weight_version", json={"new_version": version})
        _poll(
            lambda: self._json("GET", f"{url}/weight_info")["weight_version"] == version, deadline, f"version {version}"
        )

    def _load_adapter(self, url: str, adapter: Path) -> None:
        response = self.client.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": adapter.name, "lora_path": str(adapter)}
        )
        if response.status_code in (404, 405) or "LoRA is not enabled" in response.text:
            raise ValueError(
                f"{url} cannot load LoRA adapters ({response.status_code}: {response.text[:200]}): start it with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and "
                + " ".join(lora_server_args(int(json.loads((adapter / "adapter_config.json").read_text())["r"])))
            )
        response.raise_for_status()
        for name in self._served_adapters(url) - {adapter.name}:
            self.client.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()

    def _served_adapters(self, url: str) -> set[str]:
        return {model["id"] for model in self._json("GET", f"{url}/v1/models")["data"] if model.get("parent")}

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return self.client.request(method, url, **kwargs).raise_for_status().json()

    # -- server health -----------------------------------------------------------------------------------------
    def _drop(self, url: str, during: str, error: Exception) -> None:
        if url not in self.servers:
            return
        self.servers.remove(url)
        reason = f"{type(error).__name__}: {error}"
        self.events.append(
            {"event": "server_dropped", "url": url, "during": during, "error": reason, "time": time.time()}
        )
        log.warning("inference server %s dropped during %s (%s); %d left", url, during, reason, len(self.servers))

    def _live(self) -> list[str]:
        if self.servers:
            return self.servers
        if not self.events:
            raise NoServersLeftError("no inference servers: set sampler.remote.urls and/or sampler.remote.launch")
        failed = "\n".join(f"  {e['url']}: {e['during']}: {e['error']}" for e in self.events)
        raise NoServersLeftError(
            f"every inference server failed:\n{failed}\nCheck their logs and restart them, then continue with "
            "`dashrl train --resume RUN_ID`; or sample in the trainer with sampler.backend=vllm or transformers."
        )


def _parallel(calls: list[Callable[[], T]]) -> list[T | Exception]:
    """Run the calls in threads (the work is on the servers); a server's error is returned, not raised."""

    def attempt(call: Callable[[], T]) -> T | Exception:
        try:
            return call()
        except SERVER_ERRORS as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(len(calls), 1)) as pool:
        return list(pool.map(attempt, calls))


def _poll(check: Callable[[], bool], deadline: float, what: str) -> None:
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} before the timeout")
        time.sleep(0.1)
