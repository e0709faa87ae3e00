import pytest
import torch

from dash_core.config import ArithmeticTaskConfig, ModelConfig
from dash_core.data.arithmetic import ArithmeticTask
from dash_core.models import char_tokenizer, load_policy
from dash_core.rewards.grading import grade


def test_char_tokenizer_round_trips_text():
    tokenizer = char_tokenizer()
    text = "Q: 12+3=? \\boxed{15}\n"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_tiny_model_saves_and_loads_like_any_hf_directory(tmp_path):
    policy, tokenizer = load_policy(ModelConfig(), seed=0)
    assert policy.config.head_dim == 64
    policy.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_policy(ModelConfig(name=str(tmp_path)))
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    assert loaded_tokenizer("12+34=")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.allclose(policy(ids).logits, loaded(ids).logits)


def test_missing_model_names_the_fix(tmp_path):
    import pytest

    with pytest.raises(OSError, match="model.name=tiny runs the built-in model offline"):
        load_policy(ModelConfig(name=str(tmp_path / "no-model-here")))


def test_arithmetic_splits_are_disjoint_and_seeded():
    task = ArithmeticTask(ArithmeticTaskConfig(), seed=0)
    heldout = {p.id for p in task.heldout_problems(300)}
    assert len(heldout) == 300
    train = {p.id for i in range(50) for p in task.train_problems(i, 64)}
    assert not heldout & train
    assert task.train_problems(7, 5) == ArithmeticTask(ArithmeticTaskConfig(), seed=0).train_problems(7, 5)
    assert task.train_problems(7, 5) != ArithmeticTask(ArithmeticTaskConfig(), seed=1).train_problems(7, 5)


def test_arithmetic_answers_and_checker():
    task = ArithmeticTask(ArithmeticTaskConfig(digits=3), seed=0)
    for problem in task.train_problems(0, 50):
        meta = problem.metadata
        value = meta["a"] + meta["b"] if meta["op"] == "+" else meta["a"] - meta["b"]
        assert int(problem.answer[::-1]) == value and len(problem.answer) == 4
        assert problem.prompt == f"{str(meta['a']).zfill(3)[::-1]}{meta['op']}{str(meta['b']).zfill(3)[::-1]}="
    problem = task.train_problems(0, 1)[0]
    assert problem.kind == "exact"
    wrong = "0000" if problem.answer != "0000" else "1"
    assert grade([problem] * 3, [problem.answer, f" {problem.answer}\n", wrong]).rewards == [1.0, 1.0, 0.0]


def test_too_few_heldout_problems_is_an_error_not_a_hang():
    import pytest

    task = ArithmeticTask(ArithmeticTaskConfig(digits=1), seed=0)
    with pytest.raises(ValueError, match="lower eval.size or raise task.heldout_fraction"):
        task.heldout_problems(300)


def test_tensors_written_straight_from_memory_load_back_with_safetensors(tmp_path):
    """The sync file writer (the remote sampler writes one per step): every dtype the models use, scalars, empty
    tensors, views and tied tensors read back equal with safetensors' own reader."""
    from safetensors.torch import load_file

    from dash_core.models import save_tensors

    a = torch.randn(3, 4)
    tensors = {"a": a, "tied": a, "view": a[:, 1], "bf16": torch.randn(5).to(torch.bfloat16), "half": torch.randn(2).half(),
               "scalar": torch.tensor(7), "empty": torch.zeros(0, 3), "ints": torch.arange(5), "mask": torch.tensor([True, False])}  # fmt: skip
    back = load_file(save_tensors(tensors, tmp_path / "weights.safetensors"))
    assert set(back) == set(tensors)
    assert all(back[name].dtype == t.dtype and torch.equal(back[name], t) for name, t in tensors.items())
    fp8 = torch.randn(4).to(torch.float8_e4m3fn)
    back = load_file(save_tensors({"fp8": fp8}, tmp_path / "fp8.safetensors"))["fp8"]
    assert back.dtype == fp8.dtype and torch.equal(back.view(torch.uint8), fp8.view(torch.uint8))
    with pytest.raises(
        ValueError, match="complex64 tensor"
    ):  # a type the format has no name for: named, not a KeyError
        save_tensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")
