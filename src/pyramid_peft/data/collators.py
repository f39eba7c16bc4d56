"""Turn a list of features into model-ready tensors, one collator per model kind.

A feature is ``{"task_id": int, "task": str, "example": dict}``: ``task`` names the :class:`TaskSpec` that
renders the example (one of the collator's ``tasks``, the run's tasks declared in its config, else a registered
task), ``task_id`` is its position in the run's task list and reaches the model as ``task_ids`` (a LongTensor),
which the routing code needs. Every collator pads to the longest sequence in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..tasks import TaskSpec, get_task

IGNORE_INDEX = -100  # label value that the cross-entropy losses of transformers skip


class _TaskLookup:
    """Finds the :class:`TaskSpec` a feature names: among the run's own tasks first, then the registry."""

    def __init__(self, tasks: Sequence[TaskSpec] = ()):
        self.tasks = {task.name: task for task in tasks}

    def spec(self, feature: dict) -> TaskSpec:
        return self.tasks.get(feature["task"]) or get_task(feature["task"])


class TextToTextCollator(_TaskLookup):
    """Encoder-decoder (T5) batches: ``input_ids``, ``attention_mask``, ``labels``, ``task_ids``.

    Sources are truncated to ``max_source_length`` tokens, targets to ``max_target_length`` (no limit when
    None). Label padding is -100; T5 builds its decoder inputs from the labels itself.
    """

    def __init__(
        self, tokenizer, max_source_length: int = 128, max_target_length: int | None = None, tasks: Sequence = ()
    ):
        super().__init__(tasks)
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length

    def for_scoring(self) -> TextToTextCollator:
        """The collator for scoring answers by likelihood: this one (its batches carry the targets)."""
        return self

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sources, targets = zip(*(self.spec(f).to_text_to_text(f["example"]) for f in features))
        source_ids = _encode(self.tokenizer, sources, self.max_source_length)
        target_ids = _encode(self.tokenizer, targets, self.max_target_length)
        input_ids, attention_mask = _pad(source_ids, _pad_token_id(self.tokenizer))
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": _pad(target_ids, IGNORE_INDEX)[0],
            "task_ids": _task_ids(features),
        }


class CausalLMCollator(_TaskLookup):
    """Decoder-only batches, for training or for ``model.generate``.

    Training (``for_generation=False``): each sequence is the prompt (with the tokenizer's special tokens,
    e.g. LLaMA's BOS) followed by the answer and EOS, right-padded; ``labels`` copy the answer and EOS tokens
    and hold -100 everywhere else, so the loss covers the answer only. When a sequence exceeds ``max_length``
    the prompt loses its *beginning*: the end of the prompt, with its answer cue, stays next to the answer.

    Generation (``for_generation=True``): prompts only, left-padded so that generation continues from the last
    position of every row; no ``labels``.

    Tokenizers without a pad token pad with EOS; the attention mask tells pads apart. A task with
    ``chat_template`` has its prompt wrapped as one user turn by ``tokenizer.apply_chat_template`` (with the
    assistant's opening), and its answer follows as the assistant's reply.
    """

    def __init__(self, tokenizer, max_length: int = 256, for_generation: bool = False, tasks: Sequence = ()):
        super().__init__(tasks)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.for_generation = for_generation

    def for_scoring(self) -> CausalLMCollator:
        """The collator for scoring answers by likelihood: prompt then answer, as in training."""
        return CausalLMCollator(self.tokenizer, self.max_length, tasks=tuple(self.tasks.values()))

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        specs = [self.spec(f) for f in features]
        prompts, answers = map(list, zip(*(spec.to_causal_lm(f["example"]) for spec, f in zip(specs, features))))
        # Special tokens explicitly: transformers versions disagree on whether BOS is added by default.
        prompt_ids = _encode(self.tokenizer, prompts, None, add_special_tokens=True)
        for row, spec in enumerate(specs):
            if spec.chat_template:  # the reply follows the assistant's opening directly
                source, answers[row] = spec.to_text_to_text(features[row]["example"])
                prompt_ids[row] = _chat_prompt_ids(self.tokenizer, spec, source)
        pad_id = _pad_token_id(self.tokenizer)
        if self.for_generation:
            input_ids, attention_mask = _pad([ids[-self.max_length :] for ids in prompt_ids], pad_id, left=True)
            return {"input_ids": input_ids, "attention_mask": attention_mask, "task_ids": _task_ids(features)}
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        answer_ids = [ids + eos for ids in _encode(self.tokenizer, answers, None, add_special_tokens=False)]
        sequences, label_sequences = [], []
        for prompt, answer in zip(prompt_ids, answer_ids):
            answer = answer[: self.max_length]
            prompt = prompt[max(0, len(prompt) + len(answer) - self.max_length) :]
            sequences.append(prompt + answer)
            label_sequences.append([IGNORE_INDEX] * len(prompt) + answer)
        input_ids, attention_mask = _pad(sequences, pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": _pad(label_sequences, IGNORE_INDEX)[0],
            "task_ids": _task_ids(features),
        }


class ClassificationCollator(_TaskLookup):
    """Encoder batches for classification or regression heads.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer produces them), ``labels``
    and ``task_ids``. Labels are always float32, so one batch can mix classification and regression tasks;
    a classification head casts them to long. Pairs are truncated together to ``max_length`` tokens.
    """

    def __init__(self, tokenizer, max_length: int = 128, tasks: Sequence = ()):
        super().__init__(tasks)
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        triples = [self.spec(f).to_classification(f["example"]) for f in features]
        # One call per example: a batch may mix single sentences (text_b None) and pairs.
        encodings = [
            self.tokenizer(text_a, text_b, truncation=True, max_length=self.max_length, add_special_tokens=True)
            for text_a, text_b, _ in triples
        ]
        input_ids, attention_mask = _pad([e["input_ids"] for e in encodings], _pad_token_id(self.tokenizer))
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in encodings[0]:
            batch["token_type_ids"] = _pad([e["token_type_ids"] for e in encodings], 0)[0]
        batch["labels"] = torch.tensor([label for _, _, label in triples], dtype=torch.float32)
        batch["task_ids"] = _task_ids(features)
        return batch


def _chat_prompt_ids(tokenizer, spec: TaskSpec, prompt: str) -> list[int]:
    """The prompt as one user turn of the tokenizer's chat template, ending with the assistant's opening."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"task {spec.name!r} sets chat_template, but {type(tokenizer).__name__} has no chat template: use an "
            "instruct model's tokenizer, or set chat_template: false."
        )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _encode(
    tokenizer, texts: Sequence[str], max_length: int | None, add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids of each text, truncated to ``max_length`` when it is given."""
    encoded = tokenizer(
        list(texts), add_special_tokens=add_special_tokens, truncation=max_length is not None, max_length=max_length
    )
    return encoded["input_ids"]


def _pad(sequences: list[list[int]], pad_value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A (batch, longest) LongTensor of the sequences padded with ``pad_value``, and its attention mask."""
    longest = max(len(sequence) for sequence in sequences)
    values = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        columns = slice(longest - len(sequence), longest) if left else slice(0, len(sequence))
        values[row, columns] = torch.tensor(sequence, dtype=torch.long)
        mask[row, columns] = 1
    return values, mask


def _pad_token_id(tokenizer) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has neither a pad nor an EOS token; set "
            "tokenizer.pad_token before building batches."
        )
    return pad_id


def _task_ids(features: list[dict]) -> torch.Tensor:
    return torch.tensor([feature["task_id"] for feature in features], dtype=torch.long)
