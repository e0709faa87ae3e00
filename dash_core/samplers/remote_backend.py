"""The remote backend: OpenAI-compatible vLLM servers, the batch sharded across them, weights synced through files.

Each server gets a contiguous shard of the prompts; the shards run concurrently and are put back in prompt order.
Weights go through `sync_dir`, a folder every server can read: the policy is written there as safetensors and each
server reloads it through the development endpoints (`VLLM_SERVER_DEV_MODE=1`, as `dash_core.serving` starts them).
A server that errors or exceeds `timeout_s` is dropped for the rest of the run and its work goes to the others,
so a lost worker costs time, not the run.
"""

from __future__ import annotations

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
import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dash_core.config import RemoteConfig
from dash_core.samplers.base import Generation, Sampler, SamplingParams
from dash_core.samplers.vllm_backend import to_generation, vllm_request

log = logging.getLogger(__name__)
T = TypeVar("T")
# What a failing server looks like from here: refused or reset connections, timeouts, error statuses, bad bodies.
SERVER_ERRORS = (httpx.HTTPError, ValueError, KeyError, TimeoutError)
WEIGHTS_PREFIX = "weights-v"


class NoServersLeftError(RuntimeError):
    """Every inference server failed or none was given; sampling cannot go on."""


def shard(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) cut into at most `parts` contiguous, nearly equal, non-empty pieces."""
    bounds = [start + (end - start) * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


def save_weights(policy: PreTrainedModel, path: Path) -> Path:
    """Every tensor of the policy in one safetensors file at `path`, written to a temporary folder then renamed,
    so a server never reads a half-written file.

    `lm_head.weight` is kept even when tied to the embeddings (`save_pretrained` drops it, and vLLM's lm_head then
    keeps the old weights); safetensors refuses tensors that share storage, so shared ones are cloned.
    """
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in policy.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    if path.exists():  # left by an earlier process of a resumed run
        shutil.rmtree(path)
    tmp.rename(path)
    return path


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
        self._models: dict[str, str] = {}  # url -> served model name
        self.add_servers(cfg.urls)

    def add_servers(self, urls: list[str]) -> None:
        """Use more servers; after a sync, new ones load the current weights first (they start from older ones)."""
        new = [url.rstrip("/") for url in urls if url.rstrip("/") not in self.servers]
        self.servers += new
        if self.version and new:
            self._sync(new, self.sync_dir / f"{WEIGHTS_PREFIX}{self.version}")

    # -- sampling ----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None) -> list[Generation]:
        done: dict[int, list[Generation]] = {}  # first prompt of a shard -> its generations
        pending = [(0, len(prompts))] if prompts else []
        while pending:
            servers = self._live()
            jobs = [(url, piece) for span in pending for url, piece in zip(servers, shard(*span, len(servers)))]
            outcomes = _parallel([partial(self._complete, url, prompts[a:b], params, seeds and seeds[a:b]) for url, (a, b) in jobs])
            pending = []
            for (url, (a, b)), outcome in zip(jobs, outcomes):
                if isinstance(outcome, Exception):
                    self._drop(url, f"sampling prompts {a}-{b - 1}", outcome)
                    pending.append((a, b))
                else:
                    done[a] = outcome
        return [g for start in sorted(done) for g in done[start]]

    def _complete(self, url: str, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None) -> list[Generation]:
        """A shard on one server: one request, or with seeds one concurrent request per prompt (a request carries
        one seed), which the server batches as it would one request."""
        if seeds is None:
            return self._request(url, prompts, params)
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            parts = pool.map(lambda prompt, seed: self._request(url, [prompt], params, seed), prompts, seeds)
            return [g for part in parts for g in part]

    def _request(self, url: str, prompts: list[list[int]], params: SamplingParams, seed: int | None = None) -> list[Generation]:
        sent, fields = vllm_request(prompts, params)
        body = {"model": self._model(url), "prompt": sent, "return_token_ids": True, **fields}
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
    def load_weights(self, policy: PreTrainedModel) -> None:
        """Write the weights as version `n + 1` and return once every live server reports that version."""
        self.version += 1
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        path = save_weights(policy, self.sync_dir / f"{WEIGHTS_PREFIX}{self.version}")
        self._sync(list(self.servers), path)
        self._live()
        for old in self.sync_dir.glob(f"{WEIGHTS_PREFIX}*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    def _sync(self, urls: list[str], path: Path) -> None:
        outcomes = _parallel([partial(self._sync_server, url, path, str(self.version)) for url in urls])
        for url, outcome in zip(urls, outcomes):
            if isinstance(outcome, Exception):
                self._drop(url, f"weight sync to version {self.version}", outcome)

    def _sync_server(self, url: str, path: Path, version: str) -> None:
        deadline = time.monotonic() + self.cfg.timeout_s
        self._json("POST", f"{url}/collective_rpc", json={"method": "reload_weights", "kwargs": {"weights_path": str(path)}})
        # The reset is refused while blocks are held (e.g. by requests still running); it must happen, so retry.
        _poll(lambda: self._json("POST", f"{url}/reset_prefix_cache")["success"], deadline, "prefix cache reset")
        self._json("POST", f"{url}/update_weight_version", json={"new_version": version})
        _poll(lambda: self._json("GET", f"{url}/weight_info")["weight_version"] == version, deadline, f"version {version}")

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return self.client.request(method, url, **kwargs).raise_for_status().json()

    # -- server health -----------------------------------------------------------------------------------------
    def _drop(self, url: str, during: str, error: Exception) -> None:
        if url not in self.servers:
            return
        self.servers.remove(url)
        reason = f"{type(error).__name__}: {error}"
        self.events.append({"event": "server_dropped", "url": url, "during": during, "error": reason, "time": time.time()})
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
