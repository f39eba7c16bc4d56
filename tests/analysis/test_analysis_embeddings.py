"""Task embeddings: tables found for every method that learns them, cosine similarity, PCA, layer choice, figures."""

import matplotlib.image
import numpy as np
import pytest
import torch
from peft import get_peft_model

from conftest import TINY_BUILDERS
from pyramid_peft import make_peft_config
from pyramid_peft.analysis.embeddings import (
    analyze_model,
    cosine_similarity,
    pca_2d,
    select_layer,
    task_embedding_tables,
    task_vectors,
)

TASKS = ["cola", "sst2", "mrpc", "rte"]


def tiny(method: str, **options):
    config = make_peft_config(method, target_modules=["query", "value"], num_tasks=len(TASKS), **options)
    return get_peft_model(TINY_BUILDERS["bert"](), config).eval()


@pytest.mark.parametrize("method,width", [("ept", 32), ("more", 32), ("moelora", None)])
def test_tables_are_found_through_the_accounting_groups(method, width):
    tables = task_embedding_tables(tiny(method))
    assert list(tables) == [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    for table in tables.values():
        assert table.shape[0] == len(TASKS) and (width is None or table.shape[1] == width)
        assert not table.requires_grad


@pytest.mark.parametrize("method", ["lora", "hydralora"])
def test_methods_without_task_embeddings_fail_clearly(method):
    options = {} if method == "lora" else {"num_tasks": 4}
    model = get_peft_model(TINY_BUILDERS["bert"](), make_peft_config(method, target_modules=["query"], **options))
    with pytest.raises(ValueError, match="no task-embedding tables"):
        task_embedding_tables(model)


def test_one_layer_is_used_raw_and_several_average_their_cosines():
    g = torch.Generator().manual_seed(0)
    tables = {"a.q": torch.randn(4, 6, generator=g), "b.q": torch.randn(4, 10, generator=g) * 50}
    single = task_vectors({"a.q": tables["a.q"]})
    np.testing.assert_array_equal(single, tables["a.q"].numpy())
    per_layer = [cosine_similarity(t.numpy()) for t in tables.values()]
    np.testing.assert_allclose(cosine_similarity(task_vectors(tables)), np.mean(per_layer, axis=0), atol=1e-6)
    np.testing.assert_allclose(np.diag(cosine_similarity(task_vectors(tables))), 1.0, atol=1e-6)


def test_pca_separates_planted_clusters():
    vectors = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0], [0, 0.1, 0.9]])
    points, ratios = pca_2d(vectors)
    assert points.shape == (4, 2) and ratios[0] > 0.9
    assert np.sign(points[0, 0]) == np.sign(points[1, 0]) != np.sign(points[2, 0]) == np.sign(points[3, 0])


def test_layer_selection_by_full_name_or_ending():
    tables = {"encoder.layer.0.attention.self.query": 0, "encoder.layer.1.attention.self.query": 1}
    assert list(select_layer(tables, "1.attention.self.query")) == ["encoder.layer.1.attention.self.query"]
    assert select_layer(tables, None) is tables
    with pytest.raises(ValueError, match="matches 2 layers"):
        select_layer(tables, "attention.self.query")
    with pytest.raises(ValueError, match="matches no layer"):
        select_layer(tables, "value")


def test_figures_and_csvs_are_written_and_readable(tmp_path):
    model = tiny("ept")
    paths = analyze_model(model, TASKS, tmp_path, label="ept")
    for key in ("pca_png", "cosine_png"):
        image = matplotlib.image.imread(paths[key])
        assert image.ndim == 3 and min(image.shape[:2]) > 300 and image[..., :3].std() > 0.05
    cosine = np.loadtxt(paths["cosine_csv"], delimiter=",", skiprows=1, usecols=range(1, 5))
    np.testing.assert_allclose(np.diag(cosine), 1.0, atol=1e-5)
    np.testing.assert_allclose(cosine, cosine.T, atol=1e-6)
    assert paths["cosine_csv"].read_text().splitlines()[0] == "task,cola,sst2,mrpc,rte"
    one = analyze_model(model, TASKS, tmp_path / "one", layer="encoder.layer.1.attention.self.value")
    assert matplotlib.image.imread(one["pca_png"]).ndim == 3
