"""Choices scored by the likelihood of each option's own text, length-normalised (``answer_scoring: answer_text``).

Letter scoring (``likelihood``) asks which option *letter* a model finds most likely after a prompt that lists the
lettered options: a small model that has not learnt that format lands near chance whatever it knows. Answer-text
scoring asks how likely each option's text is as the continuation of the question, with the options not listed (the
cloze form), and divides each option's summed log-probability by its length in characters, so that a long option is
not beaten by a short one for its length alone. That is the ``acc_norm`` of lm-evaluation-harness (Gao et al., "A
framework for few-shot language model evaluation", https://github.com/EleutherAI/lm-evaluation-harness; the
normalisation of Brown et al., arXiv:2005.14165, section 2.4, by characters):

    prediction = argmax_i  log p(c_i | prompt) / len(c_i),   c_i = " " + option_i (causal; the option alone for seq2seq)

The options are the example's ``choices`` (BoolQ: no / yes), or the task's label words for tasks without choices.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..tasks import TaskSpec

IGNORE_INDEX = -100


def answer_options(task: TaskSpec, example: dict) -> list[str]:
    """The texts that compete: the example's own options, else the task's label words."""
    return list(example.get("choices") or task.label_words)


def cloze_prompt(task: TaskSpec, example: dict, family: str) -> str:
    """The prompt without its lettered options list: the source (seq2seq) or the source and answer cue (causal).

    A task with its own ``prompt`` template keeps it as written (the template decides what the prompt shows)."""
    cloze = task
    if task.multiple_choice and task.prompt is None:  # the same prompt, less the "choices: (A) ..." part
        cloze = replace(task, kind="classification")
    return cloze.to_causal_lm(example)[0] if family == "causal" else cloze.to_text_to_text(example)[0]


def answer_text_predictions(
    model, tokenizer, family: str, task: TaskSpec, task_ids: torch.Tensor | None, examples: list[dict], max_length
) -> list[int]:
    """Per example, the index of the option with the highest :func:`answer_text_scores` (ties: the first)."""
    scores = answer_text_scores(model, tokenizer, family, task, task_ids, examples, max_length)
    return [max(range(len(options)), key=options.__getitem__) for options in scores]


def answer_text_scores(
    model, tokenizer, family: str, task: TaskSpec, task_ids: torch.Tensor | None, examples: list[dict], max_length
) -> list[list[float]]:
    """Per example, per option, ``log p(continuation | prompt) / len(continuation)`` (see the module).

    ``task_ids``: one task id per example, passed to the model (None: the model does not route by task).
    ``max_length``: tokens of a causal sequence (the prompt loses its beginning, so that it fits with its longest
    option) or of a seq2seq source.
    """
    prompts = [cloze_prompt(task, example, family) for example in examples]
    continuations = [[(" " if family == "causal" else "") + o for o in answer_options(task, ex)] for ex in examples]
    routes = [None if task_ids is None else task_ids[i : i + 1] for i in range(len(examples))]
    if family == "causal":
        sums = [
            _causal_log_likelihoods(model, tokenizer, prompt, texts, route, max_length)
            for prompt, texts, route in zip(prompts, continuations, routes)
        ]
    else:
        sums = _seq2seq_log_likelihoods(model, tokenizer, prompts, continuations, task_ids, max_length)
    return [[total / len(text) for total, text in zip(*row)] for row in zip(sums, continuations)]


def _causal_log_likelihoods(model, tokenizer, prompt: str, texts: list[str], task_id, max_length) -> list[float]:
    """Summed log-probability of each text after ``prompt``: the prompt runs once and its key / value cache is
    shared by the options (each option then costs only its own tokens)."""
    answers = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if max_length:
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + max(map(len, answers)) - max_length) :]
    device = next(model.parameters()).device
    route = {} if task_id is None else {"task_ids": task_id.to(device)}
    first = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, **route)
    next_token = torch.log_softmax(first.logits[0, -1].float(), -1)  # scores each option's first token
    cache_name = "cache" if "cache" in first else "past_key_values"  # transformers 5.x renamed it
    cache = first[cache_name]
    cache.batch_repeat_interleave(len(texts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = _pad(answers, pad).to(device)
    mask = torch.cat([torch.ones(len(texts), len(prompt_ids)), _pad([[1] * len(a) for a in answers], 0)], 1)
    route = {} if task_id is None else {"task_ids": task_id.to(device).expand(len(texts))}
    rest = model(input_ids=input_ids, attention_mask=mask.to(device), **{cache_name: cache}, **route)
    log_probs = torch.log_softmax(rest.logits.float(), -1)  # position j scores option token j + 1
    return [
        (next_token[a[0]] + sum(log_probs[k, j, a[j + 1]] for j in range(len(a) - 1))).item() if a else 0.0
        for k, a in enumerate(answers)
    ]


def _seq2seq_log_likelihoods(model, tokenizer, prompts, continuations, task_ids, max_length) -> list[list[float]]:
    """Summed log-probability of each continuation's tokens (its special tokens left out), one batch for all."""
    rows = [(i, prompt, text) for i, (prompt, texts) in enumerate(zip(prompts, continuations)) for text in texts]
    sources = tokenizer([p for _, p, _ in rows], truncation=bool(max_length), max_length=max_length)["input_ids"]
    labels = _pad(tokenizer([t for _, _, t in rows])["input_ids"], IGNORE_INDEX)  # as trained: special tokens too
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = {"input_ids": _pad(sources, pad), "attention_mask": _pad([[1] * len(s) for s in sources], 0)}
    batch["labels"] = labels
    if task_ids is not None:
        batch["task_ids"] = task_ids[torch.tensor([i for i, _, _ in rows])]
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
    special = torch.tensor(sorted(tokenizer.all_special_ids), dtype=labels.dtype)
    targets = labels.masked_fill(torch.isin(labels, special), IGNORE_INDEX).to(device)
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    sums = (-token_loss.sum(-1)).tolist()
    grouped: list[list[float]] = [[] for _ in prompts]
    for (i, _, _), total in zip(rows, sums):
        grouped[i].append(total)
    return grouped


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])
