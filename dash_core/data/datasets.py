"""Public reasoning sets (MATH, MATH-500, GSM8K, MBPP, MBPP+) as `Problem`s, from a local file or the hub.

A local file or folder (jsonl, jsonl.gz, parquet) is read directly; a name alone goes through
`datasets.load_dataset`. Every set is mapped to one shape: the prompt (question text in a per-kind template),
the reference answer or test code, and a human-written solution for supervised baselines.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from dash_core.data.problem import Problem
from dash_core.rewards.code import mbpp_plus_tests, mbpp_tests
from dash_core.rewards.math import extract_boxed, reference_answer

TEMPLATES = {
    "math": "{question}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "code": "{question}\nWrite the Python code in a ```python code block.",
}
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # "math" or "code": picks the prompt template and the grader
    hub: str  # hub id for datasets.load_dataset
    hub_config: str | None
    default_split: str
    to_problem: Callable[[dict[str, Any], int, str], Problem | None]  # row, index, prompt_tests (see load_problems)
    in_split: Callable[[dict[str, Any], str], bool] = lambda row, split: True  # for files that hold several splits


def _math(row: dict[str, Any], index: int, prompt_tests: str) -> Problem | None:
    answer = row.get("answer") or extract_boxed(row.get("solution") or "")
    if not answer:
        return None
    return Problem(
        id=str(row.get("unique_id") or index), prompt=row["problem"], answer=answer, solution=row.get("solution"),
        kind="math", metadata={"subject": row.get("subject") or row.get("type"), "level": row.get("level")},
    )  # fmt: skip


def _gsm8k(row: dict[str, Any], index: int, prompt_tests: str) -> Problem:
    answer = reference_answer(row["answer"])
    rationale = re.sub(r"<<[^>]*>>", "", row["answer"].rsplit("####", 1)[0]).strip()
    return Problem(
        id=f"gsm8k/{index}", prompt=row["question"], answer=answer,
        solution=f"{rationale}\nThe final answer is $\\boxed{{{answer}}}$.", kind="math",
    )  # fmt: skip


def _mbpp(row: dict[str, Any], index: int, prompt_tests: str) -> Problem:
    """MBPP's published prompt shows its three asserts, which are the whole grade: a program returning the three
    expected outputs would pass. By default the prompt shows the first, as MBPP+'s does."""
    question = row.get("text") or row["prompt"]
    return Problem(
        id=f"mbpp/{row['task_id']}", prompt=question + _shown(row["test_list"] if prompt_tests == "published" else row["test_list"][:1]),
        tests=mbpp_tests(row), solution=f"```python\n{row['code']}\n```", kind="code",
    )  # fmt: skip


def _mbpp_plus(row: dict[str, Any], index: int, prompt_tests: str) -> Problem:
    task_id = str(row["task_id"]).removeprefix("Mbpp/")
    return Problem(
        id=f"mbppplus/{task_id}", prompt=row["prompt"] + _shown(row["test_list"][:1]),
        tests=mbpp_plus_tests(row), solution=f"```python\n{row['code'].strip()}\n```", kind="code",
    )  # fmt: skip


def _shown(asserts: list[str]) -> str:
    return f"\nYour code should pass {'these tests' if len(asserts) > 1 else 'this test'}:\n" + "\n".join(asserts)


def _mbpp_split(row: dict[str, Any], split: str) -> bool:
    """The standard MBPP split by task id: test 11-510, train the rest."""
    is_test = 11 <= int(row["task_id"]) <= 510
    return split == "all" or (split == "test") == is_test


def _mbpp_plus_split(row: dict[str, Any], split: str) -> bool:
    """MBPP+ ships one set; 'train'/'test' split it 70/30 by a hash of the task id (the paper trains on 70%)."""
    is_train = zlib.crc32(str(row["task_id"]).encode()) % 10 < 7
    return split == "all" or (split == "train") == is_train


DATASETS: dict[str, DatasetSpec] = {
    "math": DatasetSpec("math", "DigitalLearningGmbH/MATH-lighteval", None, "train", _math),
    "math500": DatasetSpec("math", "HuggingFaceH4/MATH-500", None, "test", _math),
    "gsm8k": DatasetSpec("math", "openai/gsm8k", "main", "test", _gsm8k),
    "mbpp": DatasetSpec("code", "google-research-datasets/mbpp", "full", "test", _mbpp, _mbpp_split),
    "mbppplus": DatasetSpec("code", "evalplus/mbppplus", None, "all", _mbpp_plus, _mbpp_plus_split),
}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl / jsonl.gz / json-lines / parquet file, or of every such file in a folder (sorted)."""
    return [row for _, row in _located_records(Path(path))]


def _located_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(file:line, row) pairs, so that a bad row can be named where the user can fix it."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIXES))
        if not files:
            raise FileNotFoundError(f"no {', '.join(SUFFIXES)} files in {path}")
        return [record for file in files for record in _located_records(file)]
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.name.endswith(".parquet"):
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    opener = gzip.open if path.name.endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: a JSON {type(row).__name__}, not an object with the set's fields")
            records.append((f"{path}:{number}", row))
    return records


def hub_records(name: str, spec: DatasetSpec, split: str) -> list[dict[str, Any]]:
    hint = f"pass a local copy instead (data path / --data-path), e.g. a jsonl file of {name}"
    import datasets

    hub_split = "test" if spec.in_split is _mbpp_plus_split else split
    try:
        return datasets.load_dataset(spec.hub, spec.hub_config, split=hub_split).to_list()
    except Exception as exc:  # offline, missing split, hub errors: all end the same way for the user
        raise FileNotFoundError(f"could not load {name!r} ({spec.hub}) from the Hugging Face hub: {exc}\n{hint}") from exc


def load_problems(
    name: str,
    path: str | None = None,
    split: str | None = None,
    size: int | None = None,
    seed: int = 0,
    template: str | None = None,
    prompt_tests: str = "one",
) -> list[Problem]:
    """Problems of set `name` (a key of DATASETS), optionally a seeded random subset of `size`. `prompt_tests`: how
    many of a code problem's tests its prompt shows, "one" or the set's "published" format (MBPP: all three)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    split = split or spec.default_split
    if path:
        records = _located_records(Path(path))
    else:
        records = [(f"{spec.hub} row {i + 1}", row) for i, row in enumerate(hub_records(name, spec, split))]
    problems = []
    for i, (where, row) in enumerate(records):
        try:
            if spec.in_split(row, split) and (problem := spec.to_problem(row, i, prompt_tests)):
                problems.append(problem)
        except (KeyError, TypeError, ValueError) as exc:
            fields = f"field {exc}" if isinstance(exc, KeyError) else f"value ({exc})"
            raise ValueError(f"{where}: a {name!r} row with a missing or malformed {fields}") from None
    if not problems:
        raise ValueError(f"no {name!r} problems in split {split!r} of {path or spec.hub}")
    if size is not None and size < len(problems):
        problems = random.Random(seed).sample(problems, size)
    text = template or TEMPLATES[spec.kind]
    return [replace(p, prompt=text.replace("{question}", p.prompt), metadata={**p.metadata, "question": p.prompt}) for p in problems]
