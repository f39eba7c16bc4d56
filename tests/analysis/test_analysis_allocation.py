"""Expert allocation: exact counts on planted routings (task and token level), tables, figures, every method."""

import math

import matplotlib.image
import numpy as np
import pytest
import torch
from peft import get_peft_model

from conftest import TINY_BUILDERS, tiny_batch
from pyramid_peft import EptConfig, Routing, make_peft_config
from pyramid_peft.analysis import plots
from pyramid_peft.analysis.allocation import (
    AllocationRecorder,
    allocation_rows,
    expert_labels,
    plot_experts,
    plot_layers,
    record_allocation,
    selection_caption,
    short_layer_names,
    summary_rows,
    task_expert_rates,
    top_experts,
    write_csv,
)
from pyramid_peft.methods.base import RoutedLayer
from pyramid_peft.registry import METHODS
from pyramid_peft.routing import TaskRoutingError

KERNELS = [2, 2, 4, 4, 6, 6, 8, 8]
IDS = torch.tensor([0, 1, 0, 0, 1])  # three examples of task 0, two of task 1
HIGH, LOW = 5.0, 4.0
P_HIGH = 1 / (1 + math.exp(LOW - HIGH))  # softmax of (5, 4): the top-2 gate weights


def ept_bert(**overrides):
    config = EptConfig(
        target_modules=["query", "value", "dense"],
        num_tasks=2,
        r=4,
        lora_dropout=0.0,
        kernel_sizes=KERNELS,
        top_k=2,
        **overrides,
    )
    return get_peft_model(TINY_BUILDERS["bert"](), config).eval()


def plant_routing(model) -> None:
    """Task 0 routes to experts {1, 3} (weights P_HIGH, 1 - P_HIGH), task 1 to {0, 7}, in every layer.

    Task t's embedding is the unit vector e_t and the gate bias is zero, so column t of the gate weight is the
    task's logit vector.
    """
    with torch.no_grad():
        for _, layer in model.base_model.routed_layers():
            table, gate = layer.ept_task_embedding["default"], layer.ept_gate["default"]
            table.zero_()
            table[0, 0] = table[1, 1] = 1.0
            gate.weight.zero_()
            gate.bias.zero_()
            gate.weight[[1, 3], 0] = torch.tensor([HIGH, LOW])
            gate.weight[[0, 7], 1] = torch.tensor([HIGH, LOW])


def batch_of(ids: torch.Tensor) -> dict:
    batch = tiny_batch("bert", batch=len(ids))
    return {**batch, "task_ids": ids}


def test_task_routing_counts_match_the_hand_computed_case():
    model = ept_bert()
    plant_routing(model)
    layers = record_allocation(model, [batch_of(IDS)], total=1)
    assert len(layers) == len(model.base_model.routed_layers()) == 11  # 2 blocks x 5, and the pooler
    expected_selected = torch.zeros(2, 8, dtype=torch.float64)
    expected_selected[0, [1, 3]] = 3
    expected_selected[1, [0, 7]] = 2
    expected_weights = torch.zeros(2, 8, dtype=torch.float64)
    expected_weights[0, [1, 3]] = torch.tensor([3 * P_HIGH, 3 * (1 - P_HIGH)], dtype=torch.float64)
    expected_weights[1, [0, 7]] = torch.tensor([2 * P_HIGH, 2 * (1 - P_HIGH)], dtype=torch.float64)
    for counts in layers.values():
        assert counts.rows.tolist() == [3, 2]  # task routing counts examples, not tokens
        assert torch.equal(counts.selected, expected_selected)
        torch.testing.assert_close(counts.weight_sum, expected_weights, rtol=1e-6, atol=1e-6)


def test_tables_of_the_planted_case():
    model = ept_bert()
    plant_routing(model)
    layers = record_allocation(model, [batch_of(IDS), batch_of(IDS[:2])])
    rates, weights = task_expert_rates(layers)
    np.testing.assert_array_equal(rates[0], [0, 1, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(rates[1], [1, 0, 0, 0, 0, 0, 0, 1])
    np.testing.assert_allclose(weights[0, [1, 3]], [P_HIGH, 1 - P_HIGH], rtol=1e-6)
    assert (top_experts(layers) == np.array([[1], [0]])).all()  # the larger gate weight breaks the count tie
    rows = allocation_rows(layers, ["cola", "rte"])
    assert len(rows) == 11 * 2 * 8
    first = next(r for r in rows if r["task"] == "cola" and r["expert"] == 2)  # experts numbered from 1
    assert first["rows"] == 4 and first["selected"] == 4 and first["selection_rate"] == 1.0
    assert first["mean_weight"] == pytest.approx(P_HIGH) == first["mean_weight_when_selected"]
    assert len(summary_rows(layers, ["cola", "rte"])) == 16
    assert expert_labels(model, 8)[:3] == ["E1 k=2", "E2 k=2", "E3 k=4"]


def test_token_routing_from_a_fake_observer_call_sequence():
    model = ept_bert()
    route = model.base_model.route
    weights = torch.tensor(
        [
            [[0.5, 0.5, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]],  # task 0; the last token is padding
            [[0, 0, 0.3, 0.7], [0, 0, 1, 0], [0, 0, 0, 1]],  # task 1
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with AllocationRecorder(model) as recorder:
        with route.call(torch.tensor([0, 1]), attention_mask=mask):
            recorder("token-layer", weights, None)  # ids come from the call, the mask drops the pad token
            recorder("other-length", torch.ones(2, 5, 4) / 4, None)  # mask does not fit: every token counts
        recorder("task-layer", torch.tensor([[0.0, 1, 0, 0]]), torch.tensor([1]))
    assert route.observer is None  # the recorder stops listening on exit
    token = recorder.layers["token-layer"]
    assert token.rows.tolist() == [2, 3]
    assert token.selected.tolist() == [[1, 2, 0, 0], [0, 0, 2, 2]]
    torch.testing.assert_close(
        token.weight_sum, torch.tensor([[0.5, 1.5, 0, 0], [0, 0, 1.3, 1.7]], dtype=torch.float64)
    )
    assert recorder.layers["other-length"].rows.tolist() == [5, 5]
    assert recorder.layers["task-layer"].rows.tolist() == [0, 1]
    assert list(recorder.layers) == ["token-layer", "other-length", "task-layer"]  # first-seen order


def test_token_routed_ept_counts_non_pad_tokens():
    model = ept_bert(router_input="token")
    ids = torch.tensor([0, 1, 0, 1])
    layers = record_allocation(model, [batch_of(ids)])  # tiny_batch pads the last two tokens of row 0
    pooler = layers.pop("pooler.dense")  # it routes the (batch, d) first-token states: one row per example
    assert pooler.rows.tolist() == [2, 2]
    for counts in layers.values():
        assert counts.rows.tolist() == [5 + 7, 7 + 7]
        torch.testing.assert_close(counts.selected.sum(dim=1), 2 * counts.rows)  # top-2 per token
        torch.testing.assert_close(counts.weight_sum.sum(dim=1), counts.rows)  # weights of a token sum to 1


def test_missing_task_ids_and_silent_methods_fail_clearly(monkeypatch):
    model = ept_bert(router_input="token")
    with AllocationRecorder(model) as recorder, pytest.raises(TaskRoutingError, match="task_ids"):
        recorder("layer", torch.ones(1, 3, 8) / 8, None)
    with pytest.raises(ValueError, match="no routed adapter"):
        AllocationRecorder(TINY_BUILDERS["bert"]())
    monkeypatch.setattr(RoutedLayer, "observe_routing", lambda self, weights, task_ids=None: None)
    with pytest.raises(RuntimeError, match="observe_routing"):
        record_allocation(ept_bert(), [batch_of(IDS)])


def test_figures_and_csv_are_written_and_readable(tmp_path):
    model = ept_bert()
    plant_routing(model)
    layers = record_allocation(model, [batch_of(IDS)])
    tasks, labels = ["cola", "rte"], expert_labels(model, 8)
    for path in (
        plot_experts(layers, tasks, tmp_path / "experts.png", labels, "EPT allocation"),
        plot_layers(layers, tasks, tmp_path / "layers.png", labels, "EPT top experts"),
    ):
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400 and image.shape[2] in (3, 4)
        assert image[..., :3].std() > 0.05  # not a blank canvas
    csv_path = write_csv(allocation_rows(layers, tasks), tmp_path / "allocation.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "layer,task,expert,rows,selected,selection_rate,mean_weight,mean_weight_when_selected"
    assert len(lines) == 1 + 11 * 2 * 8


def test_captions_say_what_a_cell_counts_task_routing_counts_layers():
    model = ept_bert()
    plant_routing(model)
    caption = selection_caption(record_allocation(model, [batch_of(IDS)]))
    assert "share of the 11 layers whose router picks the expert" in caption
    assert "Each row sums to 2:" in caption  # top_k = 2


def test_captions_of_token_routing_count_rows_and_their_sums():
    model = ept_bert(router_input="token")
    caption = selection_caption(record_allocation(model, [batch_of(torch.tensor([0, 1, 0, 1]))]))
    assert "share of the task's routed rows" in caption and "Each row sums to 2:" in caption


def test_heatmap_colours_span_the_data_not_zero_to_one():
    fig, (ax,) = plots.new_figure(4, 3)
    matrix = np.array([[0.11, 0.42], [0.2, np.nan]])
    plots.heatmap(ax, matrix, ["a", "b"], ["x", "y"], title="t", xlabel="x", ylabel="y", colorbar="c")
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vmax) == pytest.approx((0.11, 0.42))


def test_the_layer_map_puts_one_layer_per_row_with_upright_labels(tmp_path):
    model = ept_bert()
    plant_routing(model)
    layers = record_allocation(model, [batch_of(IDS)])
    fig, (ax,) = plots.new_figure(4, 3)
    codes = top_experts(layers).T
    plots.category_heatmap(
        ax,
        codes,
        short_layer_names(list(layers)),
        ["cola", "rte"],
        expert_labels(model, 8),
        title="t",
        xlabel="task",
        ylabel="layer",
        colorbar="c",
    )
    assert [t.get_text() for t in ax.get_yticklabels()] == short_layer_names(list(layers))
    assert all(t.get_rotation() == 0 for t in ax.get_yticklabels())
    assert plot_layers(layers, ["cola", "rte"], tmp_path / "l.png", expert_labels(model, 8), "t").is_file()


def test_short_layer_names_drop_the_shared_prefix():
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    assert short_layer_names(names) == ["0.attention.self.query", "1.output.dense"]


# Rows each method counts for IDS, by its declared routing: examples (task or batch routing) or non-pad tokens
# (token routing; tiny_batch pads the last two tokens of the first example, task 0's).
ROWS = {Routing.TASK: [3, 2], Routing.BATCH: [3, 2], Routing.TOKEN: [19, 14]}
ROUTED = sorted(
    name
    for name in METHODS
    if make_peft_config(name, target_modules=["query"]).capabilities().routing is not Routing.NONE
)


@pytest.mark.parametrize("method", ROUTED)
def test_every_routed_method_reports_its_routing(method):
    config = make_peft_config(method, num_tasks=2, target_modules=["query", "value"])
    model = get_peft_model(TINY_BUILDERS["bert"](), config).eval()
    layers = record_allocation(model, [batch_of(IDS)])
    expected = ROWS[config.capabilities().routing]
    assert layers
    for counts in layers.values():
        assert counts.rows.tolist() == expected
        assert bool((counts.selected <= counts.rows[:, None]).all()) and bool((counts.selected.sum(1) > 0).all())
