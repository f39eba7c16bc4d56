"""Split protocols on the real data: EPT's half-dev (docs/tasks.md), HyperFormer's (2106.04489), held-out naming."""

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
    monkeypatch.setattr("pyramid_peft.data.location.shared_data_dir", lambda: None)  # no local folder: the hub

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
    with pytest.raises(ValueError, match="choose one of: ept, hyperformer, selection"):
        build_splits("rte", "glue", ept_data_dir)


# The "selection" protocol: choose on rows carved from train, report on the whole dev set -----------------------


def positions(rows, universe):
    """Positions in ``universe`` of each of ``rows`` (rows are dicts; identity by content and position order)."""
    index = {}
    for position, row in enumerate(universe):
        index.setdefault(repr(sorted(row.items())), []).append(position)
    return [index[repr(sorted(row.items()))].pop(0) for row in rows]


@pytest.mark.parametrize(
    "task, sizes",
    [
        ("rte", (1992, 498, 277)),
        ("cola", (7551, 1000, 1043)),
        ("qnli", (8999, 1000, 5463)),
        ("sst2", (66349, 1000, 872)),
        ("stsb", (4749, 1000, 1500)),
    ],
)
def test_selection_carves_validation_from_train_and_reports_on_whole_dev(task, sizes, ept_data_dir):
    splits = build_splits(task, "selection", ept_data_dir)
    assert (len(splits.train), len(splits.eval), len(splits.test)) == sizes
    dev = load_examples(task, "validation", ept_data_dir)
    assert splits.test[: len(dev)] == dev  # the whole dev set, in its order
    train = load_examples(task, "train", ept_data_dir)
    carved = positions(splits.test[len(dev) :] + splits.eval, train)
    trained = positions(splits.train, train)
    assert not set(carved) & set(trained) and len(set(carved)) == len(carved)  # disjoint rows of train
    assert len(carved) + len(trained) == len(train)
    assert "carved from train" in splits.eval_split and splits.test_split.startswith("validation")


@pytest.mark.parametrize("task", ["mnli", "qqp"])
def test_selection_tops_the_local_heldout_split_up_to_2000_rows(task, ept_data_dir):
    splits = build_splits(task, "selection", ept_data_dir)
    heldout = load_examples(task, "heldout", ept_data_dir)
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (6999, 1000, 2000)
    assert splits.test[:1000] == heldout
    assert "held-out" in splits.test_split and "train[1000 rows, seed 2026]" in splits.test_split
    train = load_examples(task, "train", ept_data_dir)
    assert len(set(positions(splits.test[1000:] + splits.eval + splits.train, train))) == len(train)


def test_selection_is_the_same_every_time_and_seeded(ept_data_dir):
    first, again = build_splits("mrpc", "selection", ept_data_dir), build_splits("mrpc", "selection", ept_data_dir)
    assert first == again
    order = torch.randperm(3668, generator=torch.Generator().manual_seed(2026)).tolist()
    train = load_examples("mrpc", "train", ept_data_dir)
    assert first.eval == [train[i] for i in order[:733]]  # min(1000, 3668 // 5) rows
    assert build_splits("mrpc", "selection", ept_data_dir, seed=3).eval != first.eval


def test_selection_on_commonsense_reports_on_the_test_file(ept_data_dir):
    splits = build_splits("boolq", "selection", ept_data_dir)
    assert (len(splits.train), len(splits.eval), len(splits.test), splits.test_split) == (8427, 1000, 3270, "test")


def test_selection_caps_validation_and_reported_rows_with_max_eval(ept_data_dir):
    full, capped = (
        build_splits("rte", "selection", ept_data_dir),
        build_splits("rte", "selection", ept_data_dir, max_eval=8),
    )
    assert (capped.eval, capped.test, capped.train) == (full.eval[:8], full.test[:8], full.train)
    assert capped.test_split.endswith("(first 8 rows)")


def test_selection_names_where_the_validation_rows_come_from(ept_data_dir):
    assert build_splits("rte", "selection", ept_data_dir).eval_split == (
        "train[498 rows, seed 2026] (validation carved from train)"
    )
    assert build_splits("qqp", "selection", ept_data_dir).eval_split == (
        "train[1000 rows after 1000, seed 2026] (validation carved from train)"
    )
