"""Dataset loading and prompts: shipped excerpts (tests/data), the full offline copies when present, and errors."""

import ast
from pathlib import Path

import pytest

from dash_core.config import DatasetConfig
from dash_core.data import DatasetTask
from dash_core.data.datasets import load_problems, read_records
from dash_core.models import char_tokenizer
from dash_core.prompts import encode_prompts
from dash_core.rewards.grading import grade

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).parents[2] / "shared" / "data"


def test_math500_rows_become_boxed_math_prompts():
    problems = load_problems("math500", str(DATA / "math500_test.jsonl"))
    assert len(problems) == 20 and all(p.kind == "math" for p in problems)
    first = problems[0]
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.prompt.startswith("Convert the point") and first.prompt.endswith("within \\boxed{}.")
    assert first.id == "test/precalculus/807.json" and "\\boxed" in first.solution


def test_gsm8k_reference_and_solution():
    (natalia, *_) = load_problems("gsm8k", str(DATA / "gsm8k_train.jsonl"))
    assert natalia.answer == "72"
    assert "<<" not in natalia.solution and natalia.solution.endswith("\\boxed{72}$.")


def test_mbpp_split_by_task_id_and_tests():
    test = load_problems("mbpp", str(DATA / "mbpp.jsonl"), split="test")
    train = load_problems("mbpp", str(DATA / "mbpp.jsonl"), split="train")
    assert {p.id for p in test} == {f"mbpp/{i}" for i in [*range(11, 26), 367]}
    assert {p.id for p in train} == {f"mbpp/{i}" for i in [1, 2, 3, 4, 5, 927]}
    assert all(p.kind == "code" and "assert" in p.tests and p.solution.startswith("```python") for p in test)


def test_mbpp_plus_originfmt_and_its_70_30_split():
    every = load_problems("mbppplus", str(DATA / "mbppplus_originfmt.jsonl.gz"))
    train = load_problems("mbppplus", str(DATA / "mbppplus_originfmt.jsonl.gz"), split="train")
    test = load_problems("mbppplus", str(DATA / "mbppplus_originfmt.jsonl.gz"), split="test")
    assert len(every) == 20 and {p.id for p in train} | {p.id for p in test} == {p.id for p in every}
    assert not {p.id for p in train} & {p.id for p in test}
    assert every[0].id == "mbppplus/2" and "similar_elements" in every[0].prompt


def test_seeded_subsets_and_templates():
    path = str(DATA / "math500_test.jsonl")
    a = load_problems("math500", path, size=5, seed=1)
    assert [p.id for p in a] == [p.id for p in load_problems("math500", path, size=5, seed=1)]
    assert [p.id for p in a] != [p.id for p in load_problems("math500", path, size=5, seed=2)]
    custom = load_problems("math500", path, size=1, template="Q: {question}\nA:")
    assert custom[0].prompt.startswith("Q: ") and custom[0].prompt.endswith("\nA:")


def test_folders_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_records(DATA / "gsm8k_train.jsonl")
    pq.write_table(pa.Table.from_pylist(rows[:7]), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text((DATA / "gsm8k_train.jsonl").read_text())
    assert len(load_problems("gsm8k", str(tmp_path))) == 27


def test_offline_without_a_path_says_how_to_pass_one(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="pass a local copy instead"):
        load_problems("gsm8k")
    with pytest.raises(FileNotFoundError, match="(?s)DigitalLearningGmbH/MATH-lighteval.*pass a local copy instead"):
        load_problems("math")
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_problems("gsm8k", "/nonexistent/gsm8k.jsonl")
    with pytest.raises(ValueError, match="unknown dataset 'mathh'"):
        load_problems("mathh")


def test_dataset_task_walks_epochs_in_seeded_orders():
    task = DatasetTask(DatasetConfig(name="math", path=str(DATA / "math_train.jsonl")), seed=0)
    first_epoch = [p.id for i in range(4) for p in task.train_problems(i, 5)]
    assert sorted(first_epoch) == sorted(p.id for p in task.problems)
    second_epoch = [p.id for i in range(4, 8) for p in task.train_problems(i, 5)]
    assert sorted(second_epoch) == sorted(first_epoch) and second_epoch != first_epoch


def test_plain_prompts_without_a_chat_template():
    tokenizer = char_tokenizer()
    (problem,) = load_problems("math500", str(DATA / "math500_test.jsonl"), size=1)
    assert encode_prompts(tokenizer, [problem]) == [tokenizer(problem.prompt)["input_ids"]]


@pytest.mark.skipif(not SHARED.is_dir(), reason="the full offline copies live beside the checkout on project machines")
def test_full_offline_copies_load():
    assert len(load_problems("math500", str(SHARED / "math500_test.jsonl"))) == 500
    assert len(load_problems("math", str(SHARED / "math_train_12k.jsonl"))) == 11_998  # 2 rows have no answer
    assert len(load_problems("gsm8k", str(SHARED / "gsm8k_train.jsonl"))) == 7_473
    assert len(load_problems("mbpp", str(SHARED / "mbpp.jsonl"))) == 500
    assert len(load_problems("mbppplus", str(SHARED / "MbppPlus-OriginFmt.jsonl.gz"))) == 378


def _hard_coded(asserts: list[str]) -> str:
    """The program a policy writes to pass exactly the asserts it was shown (`assert f(args) == expected`)."""
    calls = [ast.parse(line).body[0].test for line in asserts]
    lines = [f"def {calls[0].left.func.id}(*args):"]
    for call in calls:
        lines += [f"    if args == {ast.unparse(ast.Tuple(call.left.args))}:", f"        return {ast.unparse(call.comparators[0])}"]
    return "\n".join(lines) + "\n"


def _simple(asserts: list[str]) -> bool:
    tests = [ast.parse(line).body[0] for line in asserts]
    return all(isinstance(t, ast.Assert) and isinstance(t.test, ast.Compare) and isinstance(t.test.left, ast.Call) for t in tests)


def test_mbpp_prompts_show_one_test_so_hard_coding_it_earns_nothing():
    rows = {row["task_id"]: row for row in read_records(DATA / "mbpp.jsonl")}
    one = load_problems("mbpp", str(DATA / "mbpp.jsonl"), split="test")
    published = load_problems("mbpp", str(DATA / "mbpp.jsonl"), split="test", prompt_tests="published")
    asserts = [rows[int(p.id.removeprefix("mbpp/"))]["test_list"] for p in one]
    simple = [(p, q, a) for p, q, a in zip(one, published, asserts) if _simple(a)][:6]
    assert len(simple) == 6
    for train, shown_all, asserts in simple:
        assert train.prompt.count("assert ") == 1 and asserts[0] in train.prompt and train.tests.count("assert ") == 3
        assert shown_all.prompt.count("assert ") == 3 and shown_all.tests == train.tests
    rewards = grade([p for p, _, _ in simple], [_hard_coded(a[:1]) for _, _, a in simple]).rewards
    assert rewards == [0.0] * 6  # the one shown assert hard-coded fails the other two
    rewards = grade([p for p, _, _ in simple], [_hard_coded(a) for _, _, a in simple]).rewards
    assert rewards == [1.0] * 6  # what the published prompt gave away: why training shows one
