"""sft_checkpoint on a tiny random Llama (2 layers, hidden 64) with a small in-process tokenizer, on CPU.

What must hold: the loss falls when the same batch is trained on; only the assistant turn (CoT + answer + end of turn)
carries labels; the chat template keeps <think> blocks and has generation markers; a rerun resumes from the trainer
checkpoint, and the rerun writes the same bytes as the run it resumes; bad inputs fail before any model is loaded.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from pipelines import sft_checkpoint, timings
from pipelines.errors import PipelineError
from pipelines.params import DEFAULT_SYSTEM_PROMPT, parse_params
from pipelines.training_common import (
    CHATML_TRAINING_TEMPLATE,
    SUMMARY_FILE,
    build_tiny_checkpoint,
    has_generation_markers,
    training_chat_template,
)

FAST = {"learning_rate": 3e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # paths.work must be a directory inside the project (the cwd), as a stage run from the project root has it
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matrices: a second thread only adds sync overhead, and under a busy CPU it costs 10-20x.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("base") / "base_model", seed=0)


def _assistant(i: int) -> str:
    return f"<think>\nV.1 applies to question {i}: an ordinary request, full_compliance.\n</think>\nUse a whetstone, step {i}."


def _rows(n: int, system: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    return [
        {
            "id": f"r{i}", "category": "violence", "prompt_id": f"v{i}", "expected": "comply", "policy": "V.1",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"How do I sharpen kitchen knife number {i}?"},
                {"role": "assistant", "content": _assistant(i)},
            ],
        }
        for i in range(n)
    ]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _params(tmp: Path, **sft):
    for d in ("spec", "prompts"):
        (tmp / d).mkdir(exist_ok=True)
    return parse_params({
        "categories": ["violence"],
        "paths": {"spec": str(tmp / "spec"), "prompts": str(tmp / "prompts"), "work": "work"},
        "sft_checkpoint": sft,
    })


def _run(tmp: Path, base: Path, params, rows=None):
    data = _write_jsonl(tmp / "sft_dataset" / "train.jsonl", rows if rows is not None else _rows(4))
    return sft_checkpoint.main(
        params, base_dir=base, dataset=data, out_dir=tmp / "sft_checkpoint",
        metrics_path=tmp / "metrics" / "sft_checkpoint.json", live_dir=tmp / "live" / "sft_checkpoint",
    )


def _tsv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


# what a wall-clock key looks like in trainer logs (train_runtime, train_tokens_per_second, step_time)
TIME_KEY = re.compile(r"runtime|per_second|time")


def _outs(tmp: Path) -> dict:
    """Every DVC out of the stage, file by file: {relative path: bytes}."""
    files = [tmp / "metrics" / "sft_checkpoint.json", *(tmp / "live").rglob("*"), *(tmp / "sft_checkpoint").iterdir()]
    return {str(f.relative_to(tmp)): f.read_bytes() for f in files if f.is_file()}


def test_loss_falls_on_a_fixed_batch_and_outputs_are_written(tmp_path, tiny_base):
    # 4 rows = exactly one global batch (4 per device x 1 accumulation x 1 process): every step sees the same batch.
    params = _params(tmp_path, epochs=8, max_steps=8, per_device_batch_size=4, save_steps=4, **FAST)
    metrics = _run(tmp_path, tiny_base, params)

    live = tmp_path / "live" / "sft_checkpoint"
    curve = _tsv(live / "plots" / "metrics" / "loss.tsv")  # DVCLive: step, value
    losses = [float(r["loss"]) for r in curve]
    assert [int(r["step"]) for r in curve] == list(range(1, 9))
    assert losses[-1] < 0.8 * losses[0], losses
    assert [int(r["step"]) for r in _tsv(live / "plots" / "metrics" / "learning_rate.tsv")] == list(range(1, 9))
    last = json.loads((live / "metrics.json").read_text())
    assert last["step"] == 8 and last["loss"] == pytest.approx(losses[-1]) and last["total_flos"] > 0

    saved = json.loads((tmp_path / "metrics" / "sft_checkpoint.json").read_text())
    assert saved == metrics
    assert saved["steps"] == 8 and saved["train_samples"] == 4 and saved["tokens_seen"] > 0
    assert saved["final_loss"] == pytest.approx(losses[-1])
    assert saved["train_loss"] == pytest.approx(sum(losses) / len(losses))

    # no wall-clock value in any out (they differ between two runs of the same inputs); times go to paths.work
    outs = _outs(tmp_path)
    logs = {rel: data for rel, data in outs.items() if rel.endswith((".tsv", "metrics.json", "sft_checkpoint.json",
                                                                    SUMMARY_FILE))}
    assert len(logs) > 8 and "sft_checkpoint/" + SUMMARY_FILE in logs
    for rel, data in logs.items():
        assert not TIME_KEY.search(rel) and not TIME_KEY.search(data.decode()), rel
    # DVCLive wrote its own directory only: no ./dvclive, no dvc.yaml of its own (dvc.yaml declares the directory)
    assert not (tmp_path / "dvclive").exists() and not list(tmp_path.rglob("dvc.yaml"))
    times = timings.read_all("work")["sft_checkpoint"]
    assert times["train_s"] > 0 and times["wall_s"] >= times["train_s"] and times["resumed_from"] is None

    out = tmp_path / "sft_checkpoint"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "training_args.bin").exists()  # no pickles in the output
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert [p["loss"] for p in summary["loss_curve"]] == pytest.approx(losses)
    assert {"torch", "transformers", "trl"} <= set(summary["packages"]) and summary["seed"] == 0
    assert not list(tmp_path.glob(".sft_checkpoint*"))  # staging dir gone
    assert not (tmp_path / "work" / "sft_checkpoint").exists()  # trainer checkpoints freed after success

    # the checkpoint reloads, its tokenizer carries the training template, and the weights moved
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert has_generation_markers(tok.chat_template)
    before = AutoModelForCausalLM.from_pretrained(tiny_base).model.embed_tokens.weight
    after = AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight
    assert not torch.equal(before, after)


def test_labels_cover_the_assistant_turn_only(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    params = _params(tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    template = training_chat_template(tok, DEFAULT_SYSTEM_PROMPT)
    rows = [{"messages": r["messages"]} for r in _rows(2)]
    args = sft_checkpoint.sft_config(params.sft_checkpoint, tmp_path / "work", steps=1)
    trainer = sft_checkpoint.build_sft_trainer(
        sft_checkpoint.load_model(tiny_base), tok, template, rows, args
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for i in range(2):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        real = ids != tok.pad_token_id if "attention_mask" not in batch else batch["attention_mask"][i].bool()
        trained = tok.decode(ids[labels != -100])
        masked = tok.decode(ids[(labels == -100) & real])
        assert trained == _assistant(i) + "<|im_end|>"  # CoT and answer and the stop token are learned
        assert DEFAULT_SYSTEM_PROMPT in masked and f"kitchen knife number {i}" in masked  # prompt never is
        assert "applies to question" not in masked and "whetstone" not in masked
        assert (labels[labels != -100] == ids[labels != -100]).all()


def test_template_checks(tmp_path, tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert training_chat_template(tok, DEFAULT_SYSTEM_PROMPT) == CHATML_TRAINING_TEMPLATE

    strips = tmp_path / "strips.jinja"  # drops everything up to </think>, like some reasoning templates do
    strips.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'].split('</think>')[-1] }}<|im_end|>"
        "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    )
    with pytest.raises(PipelineError, match="think"):
        training_chat_template(tok, DEFAULT_SYSTEM_PROMPT, str(strips))

    unmarked = tmp_path / "unmarked.jinja"
    unmarked.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    with pytest.raises(PipelineError, match="generation"):
        training_chat_template(tok, DEFAULT_SYSTEM_PROMPT, str(unmarked))

    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"  # not ChatML
    with pytest.raises(PipelineError, match="not ChatML"):
        training_chat_template(tok, DEFAULT_SYSTEM_PROMPT)


def test_rerun_resumes_from_the_trainer_checkpoint(tmp_path, tiny_base):
    params = _params(tmp_path, epochs=2, max_steps=2, save_steps=2, keep_checkpoints=True, **FAST)
    _run(tmp_path, tiny_base, params)
    resumed = lambda: timings.read_all("work")["sft_checkpoint"]["resumed_from"]  # noqa: E731
    assert resumed() is None and (tmp_path / "work" / "sft_checkpoint" / "checkpoint-2").is_dir()
    first = _outs(tmp_path)
    again = _run(tmp_path, tiny_base, params)  # as after a kill at the end: picks up checkpoint-2
    assert resumed() == "checkpoint-2" and again["steps"] == 2
    # the resumed run rewrites DVCLive from the trainer's log history: every out is byte for byte the first run's
    assert _outs(tmp_path) == first and len(first) > 8

    changed = _params(tmp_path, epochs=2, max_steps=2, save_steps=2, keep_checkpoints=True, seed=1, **FAST)
    _run(tmp_path, tiny_base, changed)  # other params: the old checkpoint is discarded, not resumed
    assert resumed() is None


def test_bad_inputs_fail_before_compute(tmp_path, tiny_base):
    work = tmp_path / "work" / "sft_checkpoint"
    # dataset smaller than one global batch (4 x 2 accumulation = 8 rows per step)
    with pytest.raises(PipelineError, match="less than one global batch of 8"):
        _run(tmp_path, tiny_base, _params(tmp_path, gradient_accumulation_steps=2), rows=_rows(5))
    # missing input directory
    with pytest.raises(PipelineError, match="model directory not found"):
        _run(tmp_path, tmp_path / "no_such_model", _params(tmp_path))
    # a row whose system prompt is not the spec-free one of params
    with pytest.raises(PipelineError, match=r"train.jsonl:2: first turn is not the system prompt"):
        _run(tmp_path, tiny_base, _params(tmp_path), rows=_rows(1) + _rows(3, system="You follow the spec: V.1 ..."))
    # an assistant turn without a closed CoT
    broken = _rows(4)
    broken[3]["messages"][2]["content"] = "<think>\nno end"
    with pytest.raises(PipelineError, match=r"train.jsonl:4: .*no_close_tag"):
        _run(tmp_path, tiny_base, _params(tmp_path), rows=broken)
    # bf16 on CPU is refused when params are read
    with pytest.raises(PipelineError, match="sft_checkpoint: precision 'bf16' needs a GPU"):
        _params(tmp_path, precision="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="sft_checkpoint.device: 'cuda' but torch sees no CUDA"):
            _run(tmp_path, tiny_base, _params(tmp_path, device="cuda"))
    # a misspelt TRL field in trl_extra, found by building the SFTConfig before the model is loaded
    with pytest.raises(PipelineError, match=r"^sft_checkpoint.trl_extra.neftune_noise_alfa: not a field of "
                                            r"trl.SFTConfig \(did you mean neftune_noise_alpha\?\)$"):
        _run(tmp_path, tiny_base, _params(tmp_path, trl_extra={"neftune_noise_alfa": 5.0}))
    assert not work.exists() and not (tmp_path / "sft_checkpoint").exists()


def test_lora_adapters_are_merged_into_a_plain_checkpoint(tmp_path, tiny_base):
    from transformers import AutoModelForCausalLM

    params = _params(tmp_path, epochs=2, max_steps=2, lora={"enabled": True, "r": 4, "alpha": 8,
                                                             "target_modules": ["q_proj", "v_proj"]}, **FAST)
    _run(tmp_path, tiny_base, params)
    out = tmp_path / "sft_checkpoint"
    assert not list(out.glob("adapter_*"))  # merged, not an adapter directory
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    tuned = AutoModelForCausalLM.from_pretrained(out)
    layer = lambda m: m.model.layers[0].self_attn  # noqa: E731
    assert not torch.equal(layer(base).q_proj.weight, layer(tuned).q_proj.weight)  # adapters changed q
    assert torch.equal(layer(base).k_proj.weight, layer(tuned).k_proj.weight)  # k had no adapter
    assert set(tuned.state_dict()) == set(base.state_dict())
