"""Split protocols on the real data: EPT's half-dev (spec 4.1), HyperFormer's (spec 4.4), held-out naming."""

import pytest
import torch

from pyramid_peft.data import build_splits, load_examples


def keys(rows):
    """Identify rows by content (a few GLUE sentences repeat, so compare as multisets)."""
    return sorted(tuple(sorted((k, str(v)) for k, v in row.items())) for row in rows)


def test_ept_small_task_evaluates_on_the_second_half_of_a_seed_1189_permutation(ept_data_dir):
    splits = build_splits("rte", "ept", ept_data_dir)
    dev = load_examples("rte", "validation", ept_data_dir)
    assert len(dev) == 277 and len(splits.eval) == 277 - 277 // 2 == 139
    # The reference codebases draw the permutation with a torch.Generator seeded with 1189.
    order = torch.randperm(277, generator=torch.Generator().manual_seed(1189)).tolist()
    assert splits.eval == [dev[i] for i in order[138:]]
    assert splits.eval_split == "validation[second half, seed 1189]"
    assert len(splits.train) == 2490
    assert splits.test is None and splits.test_split is None


@pytest.mark.parametrize("task, eval_size", [("cola", 1043 - 521), ("mrpc", 204), ("stsb", 750)])
def test_ept_other_small_tasks(task, eval_size, ept_data_dir):
    assert len(build_splits(task, "ept", ept_data_dir).eval) == eval_size


def test_ept_large_task_evaluates_on_full_dev(ept_data_dir):
    splits = build_splits("qnli", "ept", ept_data_dir)
    assert splits.eval == load_examples("qnli", "validation", ept_data_dir)
    assert splits.eval_split == "validation"


@pytest.mark.parametrize("task", ["mnli", "qqp"])
def test_heldout_rows_stand_in_for_the_missing_dev_set_and_say_so(task, ept_data_dir):
    splits = build_splits(task, "ept", ept_data_dir)
    assert splits.eval == load_examples(task, "heldout", ept_data_dir)
    assert "held-out" in splits.eval_split
    assert "dev" not in splits.eval_split and "validation" not in splits.eval_split


def test_hyperformer_small_task_splits_dev_in_two_halves(ept_data_dir):
    splits = build_splits("rte", "hyperformer", ept_data_dir)
    assert (len(splits.eval), len(splits.test)) == (138, 139)
    assert keys(splits.eval + splits.test) == keys(load_examples("rte", "validation", ept_data_dir))
    assert splits.eval_split == "validation[first half, seed 42]"
    assert splits.test_split == "validation[second half, seed 42]"


def test_hyperformer_large_task_validates_on_1000_train_rows(ept_data_dir):
    splits = build_splits("qqp", "hyperformer", ept_data_dir)
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (7999, 1000, 1000)
    assert keys(splits.train + splits.eval) == keys(load_examples("qqp", "train", ept_data_dir))
    assert splits.eval_split == "train[1000 rows, seed 42]"
    assert "held-out" in splits.test_split


def test_hyperformer_mnli_locally_names_its_stand_ins(ept_data_dir):
    splits = build_splits("mnli", "hyperformer", ept_data_dir)
    assert "mismatched" in splits.eval_split and "stand-in" in splits.eval_split
    assert "held-out" in splits.test_split
    assert splits.test == load_examples("mnli", "heldout", ept_data_dir)


def test_hyperformer_mnli_from_the_hub_uses_mismatched_then_matched(monkeypatch):
    monkeypatch.delenv("EPT_DATA_DIR", raising=False)
    monkeypatch.setattr("pyramid_peft.data.sources.shared_data_dir", lambda: None)  # no local folder: the hub

    def rows(label):
        return [{"premise": f"p{label}", "hypothesis": "h", "label": label, "idx": 0}]

    tables = {"train": rows(0), "validation_mismatched": rows(1), "validation_matched": rows(2)}
    monkeypatch.setattr("datasets.load_dataset", lambda path, name=None, split=None: tables[split])
    splits = build_splits("mnli", "hyperformer")
    assert (splits.eval_split, splits.test_split) == ("validation_mismatched", "validation_matched")
    assert (splits.eval[0]["label"], splits.test[0]["label"]) == (1, 2)


def test_commonsense_evaluates_on_the_test_file_whatever_the_protocol(ept_data_dir):
    for protocol in ("ept", "hyperformer"):
        splits = build_splits("openbookqa", protocol, ept_data_dir)
        assert (len(splits.train), len(splits.eval), splits.eval_split) == (4957, 500, "test")


def test_max_eval_keeps_the_first_rows_of_the_selection(ept_data_dir):
    full = build_splits("rte", "ept", ept_data_dir)
    capped = build_splits("rte", "ept", ept_data_dir, max_eval=10)
    assert capped.eval == full.eval[:10]
    assert capped.eval_split == "validation[second half, seed 1189] (first 10 rows)"


def test_seed_override_changes_the_half(ept_data_dir):
    assert build_splits("rte", "ept", ept_data_dir, seed=7).eval != build_splits("rte", "ept", ept_data_dir).eval


def test_unknown_protocol(ept_data_dir):
    with pytest.raises(ValueError, match="choose one of: ept, hyperformer"):
        build_splits("rte", "glue", ept_data_dir)
