"""The remote sampler against two real vLLM servers on loopback, serving a tiny model with tied embeddings (the
case where a weight file without an explicit lm_head goes stale): sharding and order, logprobs, weight sync,
servers failing before and during a batch, and the training flow on this backend.

The servers start once for the module, in parallel; the test that kills one runs last.
"""

import copy
import os
import re
import signal
import threading
import time

import httpx
import pytest
import torch
from helpers import assert_on_policy_run, max_gap
from mlflow.tracking import MlflowClient
from transformers import LlamaConfig, LlamaForCausalLM

from dash_core.config import DashConfig, ModelConfig, RemoteConfig, merge
from dash_core.learner import completion_logprobs
from dash_core.models import load_policy
from dash_core.samplers import SamplingParams
from dash_core.samplers.remote_backend import NoServersLeftError, RemoteSampler
from dash_core.serving import ServerError, VLLMServer, free_port, launch_servers, lora_server_args

TIGHT = 1e-4  # fp32: server and learner differ only in kernel rounding
PARAMS = SamplingParams(n=3, max_new_tokens=10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """The built-in tiny architecture with tied embeddings, saved as a model directory (servers and flow load it)."""
    policy, tokenizer = load_policy(ModelConfig())
    torch.manual_seed(1)
    tied = LlamaForCausalLM(LlamaConfig(**{**policy.config.to_dict(), "tie_word_embeddings": True}))
    path = tmp_path_factory.mktemp("tied-model")
    tied.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("logs"))
    started = launch_servers(model_dir, 2, free_port(8400), lora_server_args(8), dtype="float32", log_dir=logs)
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def policy(model_dir):
    policy, tokenizer = load_policy(ModelConfig(name=model_dir))
    assert policy.lm_head.weight is policy.model.embed_tokens.weight
    return policy, tokenizer


@pytest.fixture
def sampler(servers, policy, tmp_path):
    """Both servers, synced to the test's policy first (earlier tests leave other weights on them)."""
    model, tokenizer = policy
    remote = RemoteSampler(RemoteConfig(urls=[s.url for s in servers], timeout_s=60), tokenizer, str(tmp_path / "sync"))
    remote.load_weights(model)
    return remote


def prompts_for(tokenizer, count: int) -> list[list[int]]:
    """Prompts ending in different characters: a model from random weights continues mostly from the last one."""
    return [tokenizer.encode(f"{3 * i}+{i}") for i in range(count)]


def requests_served(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return sum(float(v) for v in re.findall(r"^vllm:request_success_total\{.*\} (\S+)$", metrics, re.MULTILINE))


def weight_version(url: str) -> str:
    return httpx.get(f"{url}/weight_info").json()["weight_version"]


def test_batch_is_sharded_and_reassembled_in_prompt_order(sampler, policy):
    _, tokenizer = policy
    prompts = prompts_for(tokenizer, 7)
    before = [requests_served(url) for url in sampler.servers]
    greedy = SamplingParams(n=2, max_new_tokens=10, temperature=0)
    batch = sampler.generate(prompts, greedy)
    assert all(requests_served(url) > served for url, served in zip(sampler.servers, before)), "a server got no shard"
    assert len(batch) == 14
    assert len({tuple(g.token_ids) for g in batch}) >= 5, "prompts too alike to tell apart"
    for i, prompt in enumerate(prompts):
        alone = sampler.generate([prompt], greedy)
        assert [g.token_ids for g in batch[2 * i : 2 * i + 2]] == [g.token_ids for g in alone], (
            f"prompt {i} out of place"
        )


def test_logprobs_match_the_learner(sampler, policy):
    model, tokenizer = policy
    prompts = prompts_for(tokenizer, 6)
    generations = sampler.generate(prompts, PARAMS)
    assert len(generations) == 18
    gap = max_gap(model, prompts, generations, PARAMS.n, tokenizer.pad_token_id)
    print(f"remote logprob gap: {gap:.2e}")
    assert gap < TIGHT


def test_weight_sync_moves_every_server_to_the_new_version(sampler, policy):
    model, tokenizer = policy
    prompts = prompts_for(tokenizer, 6)
    old = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generations = sampler.generate(prompts, PARAMS)
    for _ in range(3):
        optimizer.zero_grad()
        logp, _ = completion_logprobs(
            model, [p for p in prompts for _ in range(3)], [g.token_ids for g in generations], 0
        )
        (-logp.sum()).backward()
        optimizer.step()

    sampler.load_weights(model)
    assert sampler.version == 2
    assert [weight_version(url) for url in sampler.servers] == ["2", "2"]
    assert sorted(p.name for p in sampler.sync_dir.iterdir()) == ["weights-v2"]
    fresh = sampler.generate(prompts, PARAMS)
    gap = max_gap(model, prompts, fresh, PARAMS.n, tokenizer.pad_token_id)
    print(f"remote logprob gap after sync (tied): {gap:.2e}")
    assert gap < TIGHT
    assert max_gap(old, prompts, fresh, PARAMS.n, tokenizer.pad_token_id) > 0.05


def test_a_lora_policy_syncs_only_its_adapter_to_every_server(servers, policy, tmp_path):
    """Each sync after the first loads the new adapter on every server under its own name and unloads the old one;
    the servers sample the adapted policy, never merged."""
    from dash_core.config import LoraConfig
    from dash_core.models import adapter_weights, add_lora

    model, tokenizer = policy
    add_lora(model, LoraConfig(rank=8, alpha=16.0))
    remote = RemoteSampler(RemoteConfig(urls=[s.url for s in servers], timeout_s=60), tokenizer, str(tmp_path / "sync"))
    remote.load_weights(model)  # the base and the (identity) adapter
    full = remote.synced_bytes
    prompts = prompts_for(tokenizer, 6)
    for version in (2, 3):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
        remote.load_weights(model, adapter_only=True)
        adapter = sum(t.numel() * t.element_size() for t in adapter_weights(model).values())
        assert adapter <= remote.synced_bytes < adapter + 4096 < full / 5
        assert [weight_version(url) for url in remote.servers] == [str(version)] * 2
        assert all(remote._served_adapters(url) == {f"adapter-v{version}"} for url in remote.servers)
        generations = remote.generate(prompts, PARAMS)
        gap = max_gap(model, prompts, generations, PARAMS.n, tokenizer.pad_token_id)
        print(f"remote logprob gap with adapter v{version}: {gap:.2e}")
        assert gap < TIGHT
    assert sorted(p.name for p in remote.sync_dir.iterdir()) == ["adapter-v3", "weights-v1"]


def test_a_server_added_after_a_sync_gets_the_current_weights(servers, policy, tmp_path):
    model, tokenizer = policy
    remote = RemoteSampler(RemoteConfig(urls=[servers[0].url]), tokenizer, str(tmp_path))
    remote.load_weights(model)
    remote.load_weights(model)
    httpx.post(f"{servers[1].url}/update_weight_version", json={"new_version": "stale"}).raise_for_status()
    remote.add_servers([servers[1].url + "/"])
    assert remote.servers == [s.url for s in servers]
    assert weight_version(servers[1].url) == "2"


def test_train_flow_on_the_remote_backend(prefect_api, small_config, servers, model_dir):
    from flows.train import dash_train

    update = {
        "model": {"name": model_dir},
        "algo": {"tau": 0},  # every sample reaches the learner, so every iteration measures the gap
        "sampler": {"backend": "remote", "remote": {"urls": [s.url for s in servers]}},
    }
    config = DashConfig.model_validate(merge(small_config.model_dump(), update))
    run_id = dash_train(config=config)["run_id"]
    assert_on_policy_run(config.tracking.uri, run_id, "remote")


def test_train_flow_launches_and_stops_its_own_servers(prefect_api, small_config, model_dir):
    from flows.train import dash_train

    update = {
        "model": {"name": model_dir},
        "algo": {"tau": 0},
        "sampler": {"backend": "remote", "remote": {"launch": 1, "base_port": free_port(8400)}},
    }
    config = DashConfig.model_validate(merge(small_config.model_dump(), update))
    run_id = dash_train(config=config)["run_id"]
    run = MlflowClient(config.tracking.uri).get_run(run_id)
    assert run.data.metrics["sampler/servers"] == 1 and run.data.metrics["logprob_gap/mean"] < 1e-3
    port = config.sampler.remote.base_port
    assert free_port(port) == port  # the flow stopped the server it started


def test_dashrl_serve_runs_a_server_until_terminated(model_dir, tmp_path):
    import subprocess
    import sys

    port = free_port(8500)
    command = [sys.executable, "-m", "flows.cli", "serve", "--model", model_dir, "--port", str(port), "--host", "127.0.0.1",
               "--", "--max-model-len", "128"]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert weight_version(f"http://127.0.0.1:{port}") == "default"  # the weight-sync endpoints are on
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) is not None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert free_port(port) == port


def test_a_dead_server_is_dropped_before_the_batch(sampler, servers, policy, tmp_path):
    model, tokenizer = policy  # `sampler` has put this policy on both servers
    dead = f"http://127.0.0.1:{free_port(servers[-1].port + 1)}"
    prompts = prompts_for(tokenizer, 5)
    remote = RemoteSampler(RemoteConfig(urls=[dead, servers[0].url], timeout_s=60), tokenizer, str(tmp_path / "a"))
    generations = remote.generate(prompts, PARAMS)
    assert len(generations) == 15 and max_gap(model, prompts, generations, PARAMS.n, tokenizer.pad_token_id) < TIGHT
    assert remote.servers == [servers[0].url]
    assert [e["url"] for e in remote.events] == [dead] and remote.events[0]["during"] == "sampling prompts 0-1"

    syncing = RemoteSampler(RemoteConfig(urls=[dead, servers[0].url], timeout_s=60), tokenizer, str(tmp_path / "b"))
    syncing.load_weights(model)
    assert syncing.servers == [servers[0].url] and syncing.events[0]["during"] == "weight sync to version 1"

    alone = RemoteSampler(RemoteConfig(urls=[dead]), tokenizer, str(tmp_path / "c"))
    with pytest.raises(NoServersLeftError, match=re.escape(dead)):
        alone.generate(prompts, PARAMS)


def test_a_server_that_cannot_start_raises_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    with VLLMServer(str(tmp_path / "no-such-model"), free_port(8450), log_path=str(log)) as server:
        with pytest.raises(ServerError, match="exited with code") as failure:
            server.wait_ready(120)
    assert "no-such-model" in str(failure.value) and str(log) in str(failure.value)


def test_a_server_failing_mid_batch_leaves_its_shard_to_the_other(sampler, servers, policy, tmp_path):
    """Last in the module: it kills the second server. Frozen, it times out; killed, its connection drops."""
    model, tokenizer = policy  # `sampler` has put this policy on both servers
    prompts = prompts_for(tokenizer, 6)
    urls, victim = [s.url for s in servers], servers[1]
    os.killpg(victim.process.pid, signal.SIGSTOP)
    try:
        frozen = RemoteSampler(RemoteConfig(urls=urls, timeout_s=3), tokenizer, str(tmp_path / "a"))
        generations = frozen.generate(prompts, PARAMS)
        assert frozen.servers == [servers[0].url]
        assert frozen.events[0]["during"] == "sampling prompts 3-5" and "Timeout" in frozen.events[0]["error"]
        assert max_gap(model, prompts, generations, PARAMS.n, tokenizer.pad_token_id) < TIGHT

        killed = RemoteSampler(RemoteConfig(urls=urls, timeout_s=60), tokenizer, str(tmp_path / "b"))
        result = {}
        worker = threading.Thread(target=lambda: result.update(generations=killed.generate(prompts, PARAMS)))
        worker.start()
        time.sleep(1.5)  # its request to the frozen server is in flight
        os.killpg(victim.process.pid, signal.SIGKILL)
        worker.join(60)
    finally:
        os.killpg(victim.process.pid, signal.SIGKILL)
    assert len(result["generations"]) == 18
    assert max_gap(model, prompts, result["generations"], PARAMS.n, tokenizer.pad_token_id) < TIGHT
    assert [e["url"] for e in killed.events] == [victim.url] and "Timeout" not in killed.events[0]["error"]
    killed.load_weights(model)  # the run goes on with one server
    assert weight_version(servers[0].url) == "1"
