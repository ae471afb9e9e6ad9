"""Instruction fine-tuning of a causal LM: prompt -> response, loss on response tokens only.

Each example is ``prompt ids + response ids + eos``; labels are -100 on the prompt and on
padding. The prompt goes through the tokenizer's chat template (as one user turn) when it has
one and ``chat_template: true``. Prompts too long for ``max_length`` lose tokens from the
middle: the first tokens and the last ``KEEP_TAIL`` (the end of the template and the
assistant turn marker) stay.

``packing: true`` (training split only) concatenates examples into blocks of ``max_length``
tokens: no padding, labels stay -100 on every prompt so no loss crosses an example border.
Attention is NOT reset at borders: a token sees the earlier examples of its block as
context (the usual "naive" packing; it changes what the model conditions on, a little).
``train.padding_free: true`` is the exact alternative: examples joined per batch with
restarting position ids, so each attends only to itself. Evaluation never packs.

``loss_chunk_tokens: N`` computes the training loss N positions at a time without ever
holding the batch x seq x vocab logits (``peftkit/chunked_loss.py``; same value and gradients).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from peftkit.tasks.generation import GenerationConfig, GenerationTask, example_nll, pad, unwrap

KEEP_TAIL = 32


class CausalLMConfig(GenerationConfig):
    kind: Literal["causal_lm"] = "causal_lm"
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    packing: bool = False
    # training loss over chunks of this many positions, never the whole logits; None: transformers' loss
    loss_chunk_tokens: int | None = Field(None, ge=1)


class CausalLM(GenerationTask):
    kind = "causal_lm"
    model_kind = "decoder"
    Config = CausalLMConfig
    auto_class_name = "AutoModelForCausalLM"
    pipeline_tag = "text-generation"
    # GPT2LMHeadModel and kin too; a prediction's own "text" is the continuation, so the CLI echoes "input".
    model_classes = ("ForCausalLM", "LMHeadModel")
    echo_key = "input"

    @classmethod
    def check(cls, recipe) -> list[str]:
        from peftkit.step.distributed import deepspeed_requested, fsdp_requested

        problems = super().check(recipe)
        if recipe.task.loss_chunk_tokens and (fsdp_requested() or deepspeed_requested()):
            # The output layer runs after the wrapped forward has returned: sharded weights are gone by then.
            problems.append("task.loss_chunk_tokens: not under FSDP or DeepSpeed; use DDP or one process")
        return problems

    def train_loss(self, model, batch: dict):
        if not self.cfg.loss_chunk_tokens:
            return model(**batch).loss
        from peftkit.step.chunked_loss import causal_lm_loss

        return causal_lm_loss(model, batch, self.cfg.loss_chunk_tokens)

    def uses_chat_template(self) -> bool:
        return self.cfg.chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if self.uses_chat_template():
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + tok(prompt, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: str, target: str) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, full input ids, labels), the prompt cut in the middle if too long (counted)."""
        r = self.target_ids(target)
        full = self.prompt_ids(prompt)
        p = self.fit_prompt(full, self.cfg.max_length - len(r))
        self.truncated += len(p) < len(full)
        return p, p + r, [-100] * len(p) + r

    def fit_prompt(self, p: list[int], budget: int) -> list[int]:
        """Prompt ids cut in the middle to at most ``budget`` tokens."""
        if len(p) <= budget:
            return p
        tail = min(KEEP_TAIL, budget // 2)
        return p[: budget - tail] + p[len(p) - tail:]

    def encode_rows(self, split, prompts, refs):
        cols: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
        if split != "train":
            cols.update(prompt_ids=[], refs=refs)
        for prompt, rs in zip(prompts, refs):
            p, ids, labels = self.encode(prompt, rs[0])
            cols["input_ids"].append(ids)
            cols["labels"].append(labels)
            cols["length"].append(len(ids))
            if split != "train":
                cols["prompt_ids"].append(p)
        if split == "train" and self.cfg.packing:
            cols = self.pack(cols["input_ids"], cols["labels"])
        return cols

    def pack(self, ids: list[list[int]], labels: list[list[int]]) -> dict[str, list]:
        n = self.cfg.max_length
        flat_ids = [t for x in ids for t in x]
        flat_lab = [t for x in labels for t in x]
        blocks = [flat_ids[i : i + n] for i in range(0, len(flat_ids), n)]
        labs = [flat_lab[i : i + n] for i in range(0, len(flat_lab), n)]
        return {"input_ids": blocks, "labels": labs, "length": [len(b) for b in blocks]}

    def collate(self, features):
        pad_id = self.tokenizer.pad_token_id
        ids = [f["input_ids"] for f in features]
        batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(x) for x in ids], 0),
                 "labels": pad([f["labels"] for f in features], -100)}
        if "prompt_ids" in features[0]:
            # Generation continues the last position: prompts are padded on the left.
            p = [f["prompt_ids"] for f in features]
            batch["gen_input_ids"] = pad(p, pad_id, left=True)
            batch["gen_attention_mask"] = pad([[1] * len(x) for x in p], 0, left=True)
            batch["refs"] = [f["refs"] for f in features]
        return batch

    @torch.no_grad()
    def eval_step(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, tokens = example_nll(logits[:, :-1], batch["labels"][:, 1:])  # position t predicts t+1
        del logits
        texts = self.generate(model, batch["gen_input_ids"], batch["gen_attention_mask"])
        preds = [{"text": t, "nll": a, "tokens": b} for t, a, b in zip(texts, nll, tokens)]
        return preds, batch["refs"]

    def prompt_batch(self, prompts: list[str]) -> dict:
        """Prompts as in evaluation (chat template, bos, cut to leave room for a response), left-padded."""
        c = self.cfg
        ids = [self.fit_prompt(self.prompt_ids(t), c.max_length - c.max_target_length) for t in prompts]
        return {"input_ids": pad(ids, self.tokenizer.pad_token_id, left=True),
                "attention_mask": pad([[1] * len(x) for x in ids], 0, left=True)}

    def generate(self, model, input_ids, attention_mask) -> list[str]:
        """Greedy continuations of left-padded prompts, decoded without the prompt."""
        out = unwrap(model).generate(input_ids=input_ids, attention_mask=attention_mask,
                                     generation_config=self.generation_config(model))
        return self.decode(out[:, input_ids.shape[1]:])

    def logit_mask(self, batch):
        # The positions that predict a response token (t predicts t+1): vocabulary-sized rows, so not the prompt's.
        labels = batch["labels"]
        return torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], 1)

    def info(self):
        return {**super().info(), "chat_template": self.uses_chat_template(), "packing": self.cfg.packing}
