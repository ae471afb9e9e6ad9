"""Encoder-decoder fine-tuning (T5-style): the prompt is the encoder input, the response the target.

The model builds decoder inputs from the labels (shifted right from
``decoder_start_token_id``); labels are -100 on padding. Evaluation generates greedily.
Data, references and metrics are those of the causal-LM task (``generation.py``).
"""

from __future__ import annotations

from typing import Literal

import torch

from peftkit.tasks.generation import GenerationConfig, GenerationTask, example_nll, pad, unwrap


class Seq2SeqConfig(GenerationConfig):
    kind: Literal["seq2seq"] = "seq2seq"


class Seq2Seq(GenerationTask):
    kind = "seq2seq"
    model_kind = "seq2seq"
    Config = Seq2SeqConfig
    auto_class_name = "AutoModelForSeq2SeqLM"
    pipeline_tag = "text2text-generation"
    model_classes = ("ForConditionalGeneration",)  # see claims()
    echo_key = "input"

    @classmethod
    def check(cls, recipe) -> list[str]:
        problems = super().check(recipe)
        if getattr(recipe.train, "padding_free", False):
            problems.append("train.padding_free is for causal_lm tasks, not seq2seq")
        if recipe.strategy.name == "freeze":
            # "The first N blocks" is not defined for two block stacks (encoder and decoder).
            problems.append("strategy 'freeze' freezes the first N blocks of one block stack; an encoder-decoder "
                            "has two: use lora, full or strategy.target_modules with ia3")
        return problems

    @classmethod
    def claims(cls, config) -> bool:
        # Vision-language decoders are named ...ForConditionalGeneration too.
        return bool(getattr(config, "is_encoder_decoder", False))

    def encode_rows(self, split, prompts, refs):
        src, cut = self.source_ids(prompts)
        self.truncated += cut
        tgt = [self.target_ids(rs[0]) for rs in refs]
        cols = {"input_ids": src, "labels": tgt, "length": [len(s) + len(t) for s, t in zip(src, tgt)]}
        if split != "train":
            cols["refs"] = refs
        return cols

    def source_ids(self, prompts: list[str]) -> tuple[list[list[int]], int]:
        """Encoder inputs, prompts cut at the end to leave ``max_target_length`` of ``max_length``;
        and how many were cut."""
        src_len = self.cfg.max_length - self.cfg.max_target_length
        cut = sum(len(f) > src_len for f in self.tokenizer(prompts)["input_ids"])
        return self.tokenizer(prompts, truncation=True, max_length=src_len)["input_ids"], cut

    def collate(self, features):
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad(ids, self.tokenizer.pad_token_id), "attention_mask": pad([[1] * len(x) for x in ids], 0),
                 "labels": pad([f["labels"] for f in features], -100)}
        if "refs" in features[0]:
            batch["refs"] = [f["refs"] for f in features]
        return batch

    def logit_mask(self, batch):
        return batch["labels"] != -100  # decoder positions, one per target token

    @torch.no_grad()
    def eval_step(self, model, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        nll, tokens = example_nll(model(**inputs).logits, batch["labels"])  # decoder logits align with labels
        texts = self.generate(model, batch["input_ids"], batch["attention_mask"])
        preds = [{"text": t, "nll": a, "tokens": b} for t, a, b in zip(texts, nll, tokens)]
        return preds, batch["refs"]

    def prompt_batch(self, prompts: list[str]) -> dict:
        """Encoder inputs as in evaluation, right-padded."""
        ids, _ = self.source_ids(prompts)
        return {"input_ids": pad(ids, self.tokenizer.pad_token_id), "attention_mask": pad([[1] * len(x) for x in ids], 0)}

    def generate(self, model, input_ids, attention_mask) -> list[str]:
        m = unwrap(model)
        out = m.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config(
            model, decoder_start_token_id=m.config.decoder_start_token_id))
        return self.decode(out)
