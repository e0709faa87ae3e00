"""Run configuration: one pydantic model per concern, loaded from YAML presets and `--set a.b=c` overrides.

Unknown keys and bad values are errors that name the field, raised before any work starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from dash_core.rules import RULES

SECRET_WORDS = ("key", "secret", "token", "password", "credential")
MASKED = "***"


def _redact(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: MASKED if any(w in k.lower() for w in SECRET_WORDS) else _redact(v) for k, v in tree.items()}
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_STORE_URL = "dash_runs"
STORE_URL_VARIABLE = "DASH_STORE_URL"


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(Section):
    """The built-in Llama-style model (head dimension 64 so vLLM's CPU attention can run it)."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(512, gt=0)
    max_length: int = Field(128, gt=0)


class ModelConfig(Section):
    name: str = Field("tiny", description="'tiny' (built in), a Hugging Face hub id, or a local model directory")
    gguf_file: str | None = Field(None, description="GGUF file inside `name` to load through transformers")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu")
    use_chat_template: bool = Field(True, description="wrap prompts in the tokenizer's chat template when it has one")
    tiny: TinyModelConfig = TinyModelConfig()


class ArithmeticTaskConfig(Section):
    """Synthetic addition/subtraction; digits are written least-significant first, which a tiny model learns."""

    name: Literal["arithmetic"] = "arithmetic"
    digits: int = Field(2, ge=1, le=9)
    ops: str = Field("+-", pattern=r"^[+\-]+$")
    reverse_digits: bool = True
    heldout_fraction: float = Field(0.05, gt=0, lt=1)


DATASET_NAMES = Literal["math", "math500", "gsm8k", "mbpp", "mbppplus"]


class DatasetConfig(Section):
    """A public set (see dash_core/data/datasets.py): a local file/folder, or the hub when `path` is None."""

    name: DATASET_NAMES
    path: str | None = Field(None, description="local jsonl / jsonl.gz / parquet file or folder")
    split: str | None = Field(None, description="train / test / all; None takes the set's usual split")
    size: int | None = Field(None, gt=0, description="a seeded random subset of this many problems")
    prompt_template: str | None = Field(None, description="'{question}' is replaced by the problem text")
    prompt_tests: Literal["one", "published"] = Field(
        "one",
        description="how many of a code problem's tests its prompt shows: one example (a program that hard-codes it "
        "fails the rest), or the set's published format (MBPP: its three asserts, which are the whole grade)",
    )


def _task_kind(value: Any) -> str:
    name = value.get("name", "arithmetic") if isinstance(value, dict) else value.name
    return "arithmetic" if name == "arithmetic" else "dataset"


TASK_KINDS: dict[str, type[BaseModel]] = {"arithmetic": ArithmeticTaskConfig, "dataset": DatasetConfig}
TaskConfig = Annotated[
    Annotated[ArithmeticTaskConfig, Tag("arithmetic")] | Annotated[DatasetConfig, Tag("dataset")],
    Discriminator(_task_kind),
]


class VLLMConfig(Section):
    """vLLM engine settings: the in-process engine (`sampler.backend: vllm`) and the servers a run launches."""

    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="GPU memory fraction for weights + KV cache (launched servers split it)"
    )
    max_model_len: int | None = Field(None, gt=0, description="None: the model's own limit")
    enforce_eager: bool | None = Field(None, description="None: eager on CPU, CUDA graphs on GPU")
    sleep_mode: bool = Field(False, description="GPU: free the engine's memory while the learner runs")


class RemoteConfig(Section):
    """OpenAI-compatible vLLM servers (`sampler.backend: remote`), given by URL and/or launched by the flow."""

    urls: list[str] = Field(default_factory=list, description="running servers, e.g. http://gpu1:8000")
    launch: int = Field(0, ge=0, description="local servers the flow starts (and stops) itself")
    base_port: int = Field(8200, gt=0, lt=65536, description="first port of launched servers")
    timeout_s: float = Field(600, gt=0, description="per request; a server past it is dropped and its shard retried")
    sync_dir: str | None = Field(
        None,
        description="folder all servers can read, for weight sync (a subfolder per run); None: the run's store folder (local store) or a temp folder",
    )
    server_args: list[str] = Field(
        default_factory=list, description="extra vLLM API server arguments for launched servers"
    )


class SamplerConfig(Section):
    backend: Literal["transformers", "vllm", "remote"] = "transformers"
    prompts_per_iteration: int = Field(64, gt=0, description="M: prompts in one preemptive batch")
    group_size: int = Field(8, ge=2, description="G: completions per prompt")
    batch_size: int | None = Field(
        None,
        gt=0,
        description="sequences per `generate` call (transformers backend; vLLM schedules its own); None = all M x G at once",
    )
    max_new_tokens: int = Field(8, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    stop: list[str] = Field(default_factory=list, description="extra stop strings (end-of-sequence always stops)")
    max_staleness: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        0,
        description="k: rollouts may run k iterations ahead of the learner (sampled by a policy up to k steps old, "
        "corrected by truncated importance weights, algo.is_cap) while it learns; 0: exactly on-policy (the paper's "
        "DASH); auto: k chosen per block from the learner's idle time, kept down while the mismatch exceeds max_mismatch_kl",
    )
    max_mismatch_kl: float = Field(
        1e-3, gt=0, description="max_staleness=auto: the sampler-learner mismatch (train/mismatch_kl) it stays under"
    )
    vllm: VLLMConfig = VLLMConfig()
    remote: RemoteConfig = RemoteConfig()


class AlgoConfig(Section):
    """The update rule and its knobs (dash_core/rules.py has the formulas)."""

    rule: str = Field(
        "pg",
        description="the update rule, one of dash_core.rules.RULES",
        json_schema_extra=lambda schema: schema.update(enum=list(RULES)),  # the form offers the registry's rules
    )
    tau: float = Field(0.1, ge=0, description="gradient filter: drop samples with |A| < tau; 0 keeps all")
    scale_std: bool = Field(True, description="divide group-centred rewards by the group's std")
    beta: float = Field(0.0, ge=0, description="KL coefficient to a frozen reference (k3); 0 loads no reference")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range of the ratio pi / pi_old (grpo, ppo_*)")
    ppo_steps: int = Field(
        1, gt=0, description="K: optimizer steps over the batch (ppo_multi) or minibatches (ppo_mini)"
    )
    sft_source: Literal["human", "teacher"] = Field(
        "human", description="sft: human solutions, or a teacher's correct traces"
    )
    teacher: str | None = Field(
        None, description="sft teacher: model id or directory ('sweep:<preset>' inside a sweep)"
    )
    max_empty_iterations: int = Field(
        20, gt=0, description="stop after this many iterations in a row with nothing kept"
    )
    is_cap: float = Field(
        2.0,
        gt=0,
        description="cap of the importance weights pi / pi_old of samples from an older policy (sampler.max_staleness)",
    )

    @field_validator("rule")
    @classmethod
    def _registered(cls, rule: str) -> str:
        if rule not in RULES:
            raise ValueError(f"unknown update rule {rule!r} (choose from {', '.join(RULES)})")
        return rule


class LoraConfig(Section):
    """A LoRA adapter (through peft): the learner trains and syncs only it; the base weights stay frozen."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0, description="scale of the adapter's update: alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="module names (q_proj, v_proj, ...) that get an adapter; all-linear: every linear layer but the LM head",
    )


class LearnerConfig(Section):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    micro_batch_size: int = Field(64, gt=0, description="sequences per forward+backward chunk")
    tokens_per_micro_batch: Annotated[int, Field(gt=0)] | Literal["auto"] | None = Field(
        None,
        description="padded tokens per forward+backward chunk, with rows grouped by length so padding stays small; "
        "replaces micro_batch_size when set; auto: the largest that fits the memory left (probed at the first step)",
    )
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "bf16-mixed"] | None = Field(
        None,
        description="fp32 / bf16: weights, optimizer state and arithmetic in that type (model.dtype must match); "
        "bf16-mixed: float32 weights and optimizer state, bfloat16 arithmetic (autocast); None: the model's dtype",
    )
    activation_checkpointing: bool = Field(
        False, description="recompute layer activations in the backward pass: less memory, more compute"
    )
    packing: bool | None = Field(
        None,
        description="sequences of a micro-batch end to end in one row, no padding (position ids restart per sequence); "
        "None: when the attention is variable-length (flash-attention), which skips the masked part; other kernels compute it",
    )
    lora: LoraConfig | None = Field(
        None, description="train a LoRA adapter instead of every weight; None: full fine-tuning"
    )
    data_parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="with several learner processes (dashrl train --learners N, torchrun): ddp keeps the whole model, "
        "its gradients and Adam's state in each; fsdp (FSDP2) splits them across the processes, for a model whose "
        "training state does not fit one device (each process keeps one whole copy to sample from)",
    )


class WarmupConfig(Section):
    """Supervised warm-up on the task's human solutions; cached by its inputs so later runs reuse it.

    A tiny model from random weights sits on a loss plateau for a seed-dependent number of steps, so the warm-up
    stops once its sampled accuracy on fresh training problems reaches `target_accuracy`, not after a fixed count.
    """

    steps: int = Field(1500, ge=0, description="most supervised steps; 0 skips the warm-up")
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    target_accuracy: float | None = Field(
        0.2, gt=0, le=1, description="stop at this sampled accuracy; None runs all steps"
    )
    check_every: int = Field(25, gt=0, description="steps between accuracy checks")


class EvalConfig(Section):
    every: int = Field(25, gt=0, description="evaluate every N iterations (and before the first and after the last)")
    size: int = Field(500, gt=0, description="held-out problems of a generated task (arithmetic) per evaluation")
    datasets: list[DatasetConfig] = Field(
        default_factory=list, description="evaluation sets (in and out of distribution)"
    )
    temperature: float = Field(1.0, gt=0, description="temperature of the sampled accuracy")
    n: int = Field(1, gt=0, description="samples per problem for the sampled accuracy and pass@k")
    ks: list[int] = Field(default_factory=list, description="pass@k values to report (each <= n)")
    max_new_tokens: int | None = Field(None, gt=0, description="None uses sampler.max_new_tokens")
    log_samples: int = Field(20, ge=0, description="completions saved as an MLflow artifact per evaluation")

    @model_validator(mode="after")
    def _ks_fit(self) -> EvalConfig:
        if any(k < 1 or k > self.n for k in self.ks):
            raise ValueError(f"every pass@k needs 1 <= k <= eval.n = {self.n}, got ks={self.ks}")
        return self


class RewardConfig(Section):
    sandbox: Literal["bubblewrap", "weak"] = Field(
        "bubblewrap",
        description="isolation of the programs a code reward runs: bubblewrap (a code run refuses to start where it "
        "cannot run), or weak (without its namespaces and disk cap; the run is tagged dash.sandbox=weak)",
    )


class StoreConfig(Section):
    url: str | None = Field(
        None,
        description=f"fsspec URL of the rollout store: a local folder, s3://bucket/prefix, ...; unset: ${STORE_URL_VARIABLE}, else {DEFAULT_STORE_URL}",
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="passed to fsspec (e.g. endpoint)")

    @model_validator(mode="after")
    def _no_masked_credentials(self) -> StoreConfig:
        """A resumed run's config comes from the logged copy, whose credentials are masked."""
        masked = [key for key, value in _flatten(self.storage_options).items() if value == MASKED]
        if masked:
            raise ValueError(
                f"storage_options.{masked[0]} is {MASKED!r}, the mask of a logged config: give the credential again "
                f"with --set store.storage_options.{masked[0]}=..., or leave it out and use the environment's credentials"
            )
        return self


class TrackingConfig(Section):
    uri: str | None = Field(
        None,
        description=f"MLflow tracking URI; unset: $MLFLOW_TRACKING_URI (MLflow's convention), else {DEFAULT_TRACKING_URI}",
    )
    experiment: str = "dash"
    run_name: str | None = None
    parent_run_id: str | None = Field(None, description="nest this run under another (a sweep's parent run)")
    system_metrics_every_s: float | None = Field(
        10, gt=0, description="sample CPU, memory, disk, network and GPU into system/* metrics this often; None: off"
    )


class CheckpointConfig(Section):
    """Checkpoints are written in the background: the loop only copies the state in memory, but the write takes
    cores the loop could use (on two cores, one every iteration cost the embedded default a quarter of its speed).
    Between checkpoints nothing is lost: resume learns the stored batches again."""

    every: int | None = Field(10, gt=0, description="checkpoint every N iterations; None: by time only")
    every_minutes: float | None = Field(
        None, gt=0, description="checkpoint once this much wall-clock passed since the last"
    )
    keep: int = Field(2, gt=0, description="checkpoints kept in the store (older ones are deleted)")


class DashConfig(Section):
    iterations: int = Field(200, gt=0)
    budget_minutes: float | None = Field(None, gt=0, description="stop once training (not evaluation) took this long")
    budget_samples: int | None = Field(None, gt=0, description="stop once this many completions were sampled")
    seed: int = 0
    threads: int | None = Field(None, gt=0, description="torch CPU threads; None leaves torch's default")
    model: ModelConfig = ModelConfig()
    task: TaskConfig = ArithmeticTaskConfig()
    sampler: SamplerConfig = SamplerConfig()
    algo: AlgoConfig = AlgoConfig()
    learner: LearnerConfig = LearnerConfig()
    warmup: WarmupConfig = WarmupConfig()
    eval: EvalConfig = EvalConfig()
    reward: RewardConfig = RewardConfig()
    store: StoreConfig = StoreConfig()
    tracking: TrackingConfig = TrackingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _consistent(self) -> DashConfig:
        if self.sampler.batch_size is not None and self.sampler.batch_size % self.sampler.group_size:
            raise ValueError("sampler.batch_size must be a multiple of sampler.group_size (whole groups per call)")
        remote = self.sampler.remote
        if self.sampler.backend == "remote" and not (remote.urls or remote.launch):
            raise ValueError(
                "sampler.backend=remote needs servers: sampler.remote.urls and/or sampler.remote.launch > 0"
            )
        if (
            RULES[self.algo.rule].learns_from == "traces"
            and self.algo.sft_source == "teacher"
            and not self.algo.teacher
        ):
            raise ValueError("algo.sft_source=teacher needs algo.teacher: a stronger model's id or directory")
        if self.task.name != "arithmetic" and not self.eval.datasets:
            raise ValueError(
                f"task {self.task.name!r} has no built-in held-out set: list evaluation sets in eval.datasets"
            )
        if self.learner.data_parallel == "fsdp" and self.learner.lora:
            raise ValueError(
                "learner.lora trains a small adapter on a frozen base, which every process holds whole: use learner.data_parallel=ddp"
            )
        if self.learner.data_parallel == "fsdp" and self.algo.beta > 0:
            raise ValueError("learner.data_parallel=fsdp has no KL reference model: use ddp, or algo.beta=0")
        if self.sampler.max_staleness != 0:
            if self.sampler.backend == "vllm":
                raise ValueError(
                    "sampler.max_staleness samples while the learner learns, which needs a sampler of its own: use "
                    "sampler.backend=remote (inference servers; sampler.remote.launch=1 starts one beside the learner) "
                    "or transformers (a thread sampling from its own copy of the policy)"
                )
            if RULES[self.algo.rule].learns_from == "traces":
                raise ValueError(
                    f"sampler.max_staleness: algo.rule={self.algo.rule} learns from traces, not samples; set it to 0"
                )
        return self

    @model_validator(mode="after")
    def _precision_matches_weights(self) -> DashConfig:
        weights = {"fp32": "float32", "bf16": "bfloat16", "bf16-mixed": "float32"}.get(self.learner.precision or "")
        if weights and self.model.dtype != weights:
            raise ValueError(
                f"learner.precision={self.learner.precision} keeps {weights} weights: set model.dtype={weights}"
            )
        return self

    @model_validator(mode="after")
    def _outputs_from_environment(self) -> DashConfig:
        """Unset output locations come from the environment of the process that runs the config (a work pool's job
        variables send every run to the team's MLflow and bucket); the logged config records what was used."""
        if self.tracking.uri is None:
            self.tracking.uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        if self.store.url is None:
            self.store.url = os.environ.get(STORE_URL_VARIABLE) or DEFAULT_STORE_URL
        return self

    @classmethod
    def form_default(cls) -> DashConfig:
        """A flow parameter's default as a deployment's form shows it: not validated, so tracking.uri and store.url
        stay unset there, and the worker that runs it fills them from its own environment (`resolved`)."""
        return cls.model_construct()

    def resolved(self) -> DashConfig:
        """This config validated: a `form_default` gets its output locations from this process's environment."""
        return DashConfig.model_validate(self.model_dump())

    def require_standalone(self) -> None:
        """Fail before any work when the config names something only a sweep provides."""
        if self.algo.teacher and self.algo.teacher.startswith("sweep:"):
            raise ConfigError(
                f"algo.teacher {self.algo.teacher!r} names a preset of the running sweep, which only `dashrl sweep` "
                "resolves; outside a sweep set algo.teacher to a model directory or hub id"
            )

    def public(self) -> dict[str, Any]:
        """The config as logged and stored: credentials in store.storage_options are masked."""
        data = self.model_dump(mode="json")
        data["store"]["storage_options"] = _redact(data["store"]["storage_options"])
        return data

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, the form MLflow params take."""
        return _flatten(self.public())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public(), sort_keys=False)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        with path.open() as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`algo.tau=0.2` -> (['algo', 'tau'], 0.2); values are read as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. algo.tau=0.2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    paths: str | Path | list[str | Path] | None = None, overrides: list[str] = (), base: dict[str, Any] | None = None
) -> DashConfig:
    """Defaults <- `base` (e.g. a resumed run's config) <- YAML files in order <- `--set` overrides, then validate."""
    paths = [] if paths is None else [paths] if isinstance(paths, (str, Path)) else list(paths)
    data = dict(base or {})
    for path in paths:
        data = merge(data, read_yaml(path))
    for text in overrides:
        keys, value = parse_override(text)
        update: Any = value
        for key in reversed(keys):
            update = {key: update}
        data = merge(data, update)
    return validate(data, source=" + ".join(map(str, paths)) or "config")


def validate(data: dict[str, Any], source: str = "config") -> DashConfig:
    try:
        return DashConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {source}:\n" + "\n".join(_describe(err) for err in exc.errors())) from None


def _describe(err: dict[str, Any]) -> str:
    model, shown = _walk(list(err["loc"]))
    field = ".".join(shown) or "(top level)"
    if err["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields) if model else "?"
        return f"  {field}: unknown key (valid keys here: {known})"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    return f"  {field}: {message}" + ("" if isinstance(value, dict) else f" (got {value!r})")


def _walk(loc: list[Any]) -> tuple[type[BaseModel] | None, list[str]]:
    """The config model holding the last key of an error location, and the location as a user writes it
    (union tags such as 'dataset' dropped, list indexes kept)."""
    model: type[BaseModel] | None = DashConfig
    shown: list[str] = []
    for part in loc[:-1]:
        if isinstance(part, int):
            shown.append(str(part))
        elif part in TASK_KINDS and shown and shown[-1] == "task":
            model = TASK_KINDS[part]
        elif model is not None and part in model.model_fields:
            shown.append(part)
            inner = _models_in(model.model_fields[part].annotation)
            model = inner[0] if len(inner) == 1 else None
        else:
            shown.append(str(part))
            model = None
    return model, shown + [str(part) for part in loc[-1:]]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]
