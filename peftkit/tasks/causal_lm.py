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

Conversations (``task.chat_format``: ``messages`` = a 'messages' column of role/content
turns, ``sharegpt`` = a 'conversations' column of from/value turns, ``auto`` = whichever
column the data has, else ``none`` = the prompt template) go through the tokenizer's chat
template with the loss on every assistant turn (``peftkit/tasks/chat.py``); packing joins
whole conversations, never cutting one at a block border.

``task.forgetting`` (``peftkit/tasks/forgetting.py``): the LM loss on general text before and
after training, so a comparison shows what each strategy costs the model outside the task.

``loss_chunk_tokens: N`` computes the training loss N positions at a time without ever
holding the batch x seq x vocab logits (``peftkit/chunked_loss.py``; same value and gradients).
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
from pydantic import Field

from peftkit.errors import DataError, UserError
from peftkit.tasks import chat
from peftkit.tasks.data import columns
from peftkit.tasks.forgetting import ForgettingConfig
from peftkit.tasks.generation import GenerationConfig, GenerationTask, example_nll, pad, unwrap

KEEP_TAIL = 32


class CausalLMConfig(GenerationConfig):
    kind: Literal["causal_lm"] = "causal_lm"
    chat_template: bool = True  # use the tokenizer's chat template when it has one
    packing: bool = False
    # training loss over chunks of this many positions, never the whole logits; None: transformers' loss
    loss_chunk_tokens: int | None = Field(None, ge=1)
    # conversations: auto (a 'messages' or 'conversations' column), none (task.prompt), messages, sharegpt
    chat_format: Literal["auto", "none", "messages", "sharegpt"] = "auto"
    forgetting: ForgettingConfig = ForgettingConfig()


class CausalLM(GenerationTask):
    kind = "causal_lm"
    model_kind = "decoder"
    Config = CausalLMConfig
    auto_class_name = "AutoModelForCausalLM"
    pipeline_tag = "text-generation"
    # GPT2LMHeadModel and kin too; a prediction's own "text" is the continuation, so the CLI echoes "input".
    model_classes = ("ForCausalLM", "LMHeadModel")
    echo_key = "input"

    def __init__(self, cfg: CausalLMConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        # the conversation format in use: None until the data says (chat_format: auto)
        self.chat_format: str | None = None if cfg.chat_format == "auto" else cfg.chat_format
        self._conv: dict[str, chat.Encoded | str] = {}  # rendered conversations (or why not), by content


    # -- conversations --------------------------------------------------------------------
    def load_builtin(self, name: str):
        if name == "builtin:rotten-tomatoes-chat":
            return chat.rotten_tomatoes_chat(name)
        return super().load_builtin(name)

    def is_chat(self) -> bool:
        return self.chat_format not in (None, "none")

    def _clean(self, split: str, ds):
        if self.chat_format is None:
            self.chat_format = chat.detect(ds.column_names)
            print(f"peftkit: task.chat_format=auto: {self._chose()}", file=sys.stderr, flush=True)
        if self.is_chat():
            self._require_template()
        return super()._clean(split, ds)

    def _chose(self) -> str:
        if not self.is_chat():
            return "no 'messages' or 'conversations' column; prompt/response columns (none)"
        return (f"column '{chat.COLUMN[self.chat_format]}' found: conversations as {self.chat_format}, "
                "rendered with the tokenizer's chat template")

    def _require_template(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"model.name: the tokenizer has no chat template, and task.chat_format={self.chat_format} "
                            "data needs one (use an instruct/chat model, or task.chat_format: none with task.prompt)")
        if not self.cfg.chat_template:
            raise DataError("task.chat_template: false, but conversations are rendered with the chat template; "
                            "set it true or use task.chat_format: none")

    def columns(self) -> list[str]:
        return [chat.COLUMN[self.chat_format]] if self.is_chat() else super().columns()

    def conversation(self, conv) -> chat.Encoded | str:
        """The encoded conversation, or why it cannot be used (memoised: checked, then encoded)."""
        import json

        key = json.dumps(conv, sort_keys=True, default=str)
        if key not in self._conv:
            try:
                self._conv[key] = chat.encode(self.tokenizer, chat.normalize(conv, self.chat_format),
                                              self.cfg.max_length)
            except chat.BadConversation as e:
                self._conv[key] = str(e)
        return self._conv[key]

    def bad_row(self, row: dict) -> str | None:
        if not self.is_chat():
            return super().bad_row(row)
        enc = self.conversation(row[chat.COLUMN[self.chat_format]])
        return enc if isinstance(enc, str) else None

    def encode_split(self, split: str, ds):
        if not self.is_chat():
            return super().encode_split(split, ds)
        import datasets

        col = chat.COLUMN[self.chat_format]
        encs = [self.conversation(c) for c in columns(ds, [col])[col]]  # bad ones were dropped by _clean
        self.truncated += sum(e.truncated for e in encs)
        train = split == "train"
        cols = {"input_ids": [e.ids for e in encs], "labels": [e.train_labels if train else e.eval_labels for e in encs],
                "length": [len(e.ids) for e in encs]}
        if not train:
            cols.update(prompt_ids=[e.prompt_ids for e in encs], refs=[[e.target] for e in encs])
        elif self.cfg.packing:
            cols = chat.pack_whole(cols["input_ids"], cols["labels"], self.cfg.max_length)
        return datasets.Dataset.from_dict(cols)

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

    def prompt_ids(self, prompt) -> list[int]:
        """A prompt's ids: a text (as one user turn when the chat template is used), or a
        conversation so far (a list of turns) with the generation prompt."""
        tok = self.tokenizer
        if isinstance(prompt, list):
            text = chat.render(tok, prompt, generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
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

    def predict_prompt(self, x):
        """A conversation (a list of turns, or an object with a 'messages'/'conversations' list)
        for chat data; otherwise the prompt template's columns."""
        fmt = self.chat_format or (chat.detect(list(x)) if isinstance(x, dict) else "none")
        if isinstance(x, list) and fmt == "none":
            fmt = "messages"
        if fmt == "none":
            return super().predict_prompt(x)
        self._require_template()
        turns = x.get(chat.COLUMN[fmt]) if isinstance(x, dict) else x
        try:
            # the conversation so far: a trailing assistant turn is what would be generated, so it goes
            msgs = chat.normalize(list(turns or []) + [_PLACEHOLDER[fmt]], fmt)[:-1]
        except chat.BadConversation as e:
            raise UserError(f"predict: conversation {str(x)[:80]}: {e}") from None
        return msgs

    def logit_mask(self, batch):
        # The positions that predict a response token (t predicts t+1): vocabulary-sized rows, so not the prompt's.
        labels = batch["labels"]
        return torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], 1)

    def info(self):
        return {**super().info(), "chat_template": self.uses_chat_template(), "packing": self.cfg.packing,
                "chat_format": self.chat_format or self.cfg.chat_format}


# normalize() wants an assistant turn; predict appends this one and drops it again.
_PLACEHOLDER = {"messages": {"role": "assistant", "content": "-"}, "sharegpt": {"from": "gpt", "value": "-"}}
