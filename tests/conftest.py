"""Hermetic test environment: Prefect in a temp home (ephemeral API via one session harness), MLflow in temp
sqlite files, no telemetry, one torch thread (tests may run beside other processes on two cores), vLLM in-process
with a small CPU KV cache."""

import os
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dash-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.update(
    DO_NOT_TRACK="true",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_LEVEL="WARNING",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    MLFLOW_DISABLE_TELEMETRY="true",
    TRANSFORMERS_VERBOSITY="error",
    HF_HUB_OFFLINE="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    AWS_DEFAULT_REGION="us-east-1",
)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the in-process engine, weights synced in memory
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

import pytest  # noqa: E402
import torch  # noqa: E402

from dash_core.config import DashConfig  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server for the whole session (it takes 10-15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_options():
    """A real S3 API on loopback (moto's server mode), as s3fs tests itself; fsspec storage options for it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    server.stop()


@pytest.fixture
def s3_bucket(s3_options) -> str:
    import uuid

    import s3fs

    bucket = f"dash-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_options).mkdir(bucket)
    return bucket


@pytest.fixture
def small_config(tmp_path) -> DashConfig:
    """A run that takes seconds: 1-digit sums (a short warm-up gives mixed rewards), a few prompts, small evals."""
    return DashConfig.model_validate(
        {
            "iterations": 2,
            "threads": 1,
            "task": {"digits": 1, "heldout_fraction": 0.2},
            "sampler": {"prompts_per_iteration": 4, "group_size": 4},
            "learner": {"micro_batch_size": 6},
            "warmup": {"steps": 150, "batch_size": 16, "target_accuracy": None},
            "eval": {"every": 1, "size": 8, "log_samples": 4},
            "store": {"url": str(tmp_path / "store")},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"},
        }
    )
