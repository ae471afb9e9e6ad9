"""Forgetting: LM loss on general text before/after, planted so the sign is known."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import built, gen_recipe

from peftkit.errors import DataError
from peftkit.tasks import forgetting as F


def _task_and_model(tiny_models, instr_dir, **forgetting):
    b = built(gen_recipe(tiny_models["llama"], instr_dir, strategy="full",
                         task={"forgetting": {"sequences": 8, "max_length": 32, **forgetting}}))
    return b.task, b.model


def test_training_on_the_text_itself_is_negative_forgetting(tiny_models, instr_dir):
    task, model = _task_and_model(tiny_models, instr_dir)
    start = F.measure(task, model)
    seqs = torch.tensor(F.blocks(task.cfg.forgetting, task.tokenizer))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):  # plain LM training on the forgetting blocks themselves
        loss = model(input_ids=seqs, labels=seqs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    f = F.summarize(start, F.measure(task, model))
    assert f["rise"] < -0.1 and f["rise_ci95"][1] < 0 and f["perplexity_after"] < f["perplexity_before"]
    assert f["rise"] == pytest.approx(f["loss_after"] - f["loss_before"]) and f["rise_se"] > 0


def test_perturbed_model_is_positive_forgetting(tiny_models, instr_dir):
    task, model = _task_and_model(tiny_models, instr_dir)
    start = F.measure(task, model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    f = F.summarize(start, F.measure(task, model))
    assert f["rise"] > 0.1 and f["rise_ci95"][0] > 0
    same = F.summarize(start, start)
    assert same["rise"] == 0 and same["rise_se"] == 0


def test_user_file_and_errors(tiny_models, instr_dir, tmp_path):
    txt = tmp_path / "general.txt"
    txt.write_text("\n\n".join(f"Paragraph {i} is about the weather in spring and the trains." for i in range(60)))
    task, _ = _task_and_model(tiny_models, instr_dir, data=str(txt))
    blocks = F.blocks(task.cfg.forgetting, task.tokenizer)
    assert len(blocks) == 8 and {len(b) for b in blocks} == {32}
    assert len(F.read_texts(F.BUILTIN)) >= 100  # the shipped sample
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "too short"}) + "\n")
    with pytest.raises(DataError, match=r"task.forgetting.data \(.*short.jsonl\): \d+ tokens, fewer than"):
        F.blocks(task.cfg.forgetting.model_copy(update={"data": str(short)}), task.tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl\): line 2: expected an object with a 'text' string"):
        F.read_texts(str(bad))
    with pytest.raises(DataError, match="file not found"):
        F.read_texts(str(tmp_path / "nope.txt"))


def test_off_for_encoders_and_when_disabled(tiny_models, instr_dir, sentiment_dir):
    from conftest import tiny_recipe

    enc = built(tiny_recipe(tiny_models["bert"], sentiment_dir))
    assert F.before(enc.task, enc.model, "unused", False) is None
    assert F.after(None, enc.task, enc.model) == {"skipped": "measured only for decoders (causal_lm)"}
    task, model = _task_and_model(tiny_models, instr_dir, enabled=False)
    assert F.after(F.before(task, model, "unused", False), task, model)["skipped"].startswith("off")


def test_a_non_utf8_forgetting_file_is_named_by_line_and_column(tmp_path):
    from peftkit.errors import DataError
    from peftkit.tasks.forgetting import read_texts

    f = tmp_path / "general.txt"
    f.write_bytes(b"first paragraph\n\nsecond \xff one\n")
    with pytest.raises(DataError, match=r"task.forgetting.data: .*general.txt: line 3, column 8 \(byte 24\)"):
        read_texts(str(f))
