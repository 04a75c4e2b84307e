"""The tabular format (CSV/Parquet -> standardized, encoded feature shards), the mlp kind and
binary ROC AUC: unit tests, no Ray (tabular data is prepared on the driver)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.data import DataError, prepare
from orchestrator.data.shards import held_out
from orchestrator.models import DataInfo, build_model, input_example
from orchestrator.spec import DataSpec, WorkloadSpec
from orchestrator.train.roc_auc import AUC_BINS, roc_auc, score_histogram

# 40 rows: a numeric column with gaps, a constant one, a categorical one with a gap, and
# text labels; the split sends ~25% (by sample id) to eval.
ROWS = 40
EVAL_FRACTION = 0.25


def _table() -> pa.Table:
    rng = np.random.default_rng(0)
    size = [float(v) for v in rng.normal(10, 3, ROWS).round(3)]
    size[3] = size[17] = None  # type: ignore[call-overload]
    color = [["red", "green", "blue"][i % 3] for i in range(ROWS)]
    color[5] = None  # type: ignore[call-overload]
    label = ["spam" if i % 4 == 0 else "ham" if i % 4 == 1 else "eggs" for i in range(ROWS)]
    return pa.table(
        {
            "size": pa.array(size, pa.float64()),
            "flat": pa.array([7] * ROWS, pa.int64()),
            "color": pa.array(color, pa.string()),
            "kind": pa.array(label, pa.string()),
        }
    )


def _csv(path: Path, table: pa.Table) -> Path:
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, path)
    return path


def _spec(train: Path, tmp_path: Path, **kw: object) -> DataSpec:
    settings = {
        "train": str(train),
        "format": "tabular",
        "label_column": "kind",
        "categorical": ["color"],
        "eval_fraction": EVAL_FRACTION,
        "shard_rows": 16,
        "cache_dir": str(tmp_path / "cache"),
    }
    return DataSpec.model_validate(settings | kw)


def _rows(prepared, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in prepared.files(split)])


def test_preparation_standardizes_with_train_statistics_only(tmp_path: Path) -> None:
    table = _table()
    prepared = prepare(_spec(_csv(tmp_path / "t.csv", table), tmp_path))
    m = prepared.manifest
    info = m["tabular"]
    assert m["kind"] == "tabular" and m["format"] == "tabular"
    assert m["settings"]["label_column"] == "kind" and m["settings"]["categorical"] == ["color"]
    # Labels: sorted names -> ids; every feature column described in order.
    assert info["class_names"] == ["eggs", "ham", "spam"] and info["num_classes"] == 3
    size, flat, color = info["columns"]
    assert [c["name"] for c in info["columns"]] == ["size", "flat", "color"]
    assert color == {"name": "color", "kind": "categorical", "categories": ["blue", "green", "red"]}
    assert info["num_features"] == 1 + 1 + 4  # color: 3 categories + the missing slot

    train, evals = _rows(prepared, "train"), _rows(prepared, "eval")
    assert train.num_rows + evals.num_rows == ROWS
    assert train.schema.field("features").type == pa.list_(pa.float32(), 6)
    ids = train["sample_id"].to_pylist()
    assert ids == [i for i in range(ROWS) if not held_out(i, EVAL_FRACTION)]
    assert evals["sample_id"].to_pylist() == [i for i in range(ROWS) if held_out(i, EVAL_FRACTION)]

    # The statistics are the training rows', not all rows' (which differ here).
    raw = np.array(table["size"].to_pylist(), dtype=float)
    seen = raw[ids][~np.isnan(raw[ids])]
    assert size["kind"] == "numeric"
    assert size["mean"] == pytest.approx(seen.mean()) and size["std"] == pytest.approx(seen.std())
    assert size["mean"] != pytest.approx(np.nanmean(raw))
    assert flat == {"name": "flat", "kind": "numeric", "mean": 7.0, "std": 1.0}  # constant -> 0

    both = pa.concat_tables([train, evals]).sort_by("sample_id")
    vectors = np.array(both["features"].to_pylist(), dtype=np.float32)
    expected = np.where(np.isnan(raw), 0.0, (raw - seen.mean()) / seen.std())  # missing -> 0
    assert np.allclose(vectors[:, 0], expected, atol=1e-5)
    assert (vectors[:, 1] == 0).all()
    one_hot = {"blue": [1, 0, 0, 0], "green": [0, 1, 0, 0], "red": [0, 0, 1, 0], None: [0, 0, 0, 1]}
    for row, value in enumerate(table["color"].to_pylist()):
        assert vectors[row, 2:].tolist() == one_hot[value], row
    names = info["class_names"]
    assert [names[i] for i in both["label"].to_pylist()] == table["kind"].to_pylist()
    # The manifest is plain JSON, as written.
    assert json.loads(Path(prepared.root).parent.joinpath("manifest.json").read_text()) == m


def test_parquet_source_numeric_labels_sorted_and_eval_only_categories(tmp_path: Path) -> None:
    train = pa.table({"x": [1.0, 2.0, 3.0, 4.0], "c": ["a", "b", "a", "b"], "y": [10, 2, 10, 2]})
    evals = pa.table({"x": [5.0, 6.0], "c": ["z", "a"], "y": [2, 10]})
    pq.write_table(train, tmp_path / "train.parquet")
    pq.write_table(evals, tmp_path / "eval.parquet")
    spec = _spec(
        tmp_path / "train.parquet",
        tmp_path,
        eval=str(tmp_path / "eval.parquet"),
        label_column="y",
        categorical=["c"],
    )
    prepared = prepare(spec)
    info = prepared.manifest["tabular"]
    assert info["class_names"] == ["2", "10"]  # numerically, not as text
    assert _rows(prepared, "train")["sample_id"].to_pylist() == [0, 1, 2, 3]  # eval source: eval
    got = _rows(prepared, "eval")
    assert got["sample_id"].to_pylist() == [4, 5] and got["label"].to_pylist() == [0, 1]
    # A category the training split never had ("z") is all zeros.
    assert np.array(got["features"].to_pylist())[:, 1:].tolist() == [[0, 0, 0], [1, 0, 0]]


def test_auto_takes_csv_as_tabular(tmp_path: Path) -> None:
    csv = _csv(tmp_path / "t.csv", _table())
    assert prepare(_spec(csv, tmp_path, format="auto")).manifest["format"] == "tabular"


def test_declared_features_keep_their_order(tmp_path: Path) -> None:
    csv = _csv(tmp_path / "t.csv", _table())
    prepared = prepare(_spec(csv, tmp_path, features=["color", "size"]))
    assert [c["name"] for c in prepared.manifest["tabular"]["columns"]] == ["color", "size"]
    assert prepared.manifest["tabular"]["num_features"] == 5


# (id, CSV text, data overrides, expected fragments): each refused with exit 2, naming the
# file, the field and what is wrong.
BAD_TABLES = [
    (
        "label-missing",
        "a,b,label\n1,2,0\n3,4,1\n",
        "label_column: target",
        ["t.csv", "no label column 'target'", "data.label_column", "the columns are: a, b, label"],
    ),
    (
        "label-one-class",
        "a,b,target\n1,2,1\n3,4,1\n5,6,1\n",
        "label_column: target",
        ["t.csv", "'target'", "has one class only ('1')", "two or more"],
    ),
    (
        "text-in-numbers",
        "a,b,target\n1,2,0\n3,oops,1\n5,6,1\n",
        "label_column: target",
        ["t.csv", "feature column 'b'", "'oops'", "data.categorical"],
    ),
    (
        "feature-not-a-column",
        "a,b,target\n1,2,0\n3,4,1\n",
        "{label_column: target, features: [a, bb]}",
        ["t.csv", "data.features names 'bb'", "did you mean 'b'?", "the columns are: a, b, target"],
    ),
    (
        "label-empty",
        "a,b,target\n1,2,0\n3,4,\n",
        "label_column: target",
        ["t.csv", "have no 'target'", "data row 2"],
    ),
]


@pytest.mark.parametrize(
    ("csv", "data", "expected"), [c[1:] for c in BAD_TABLES], ids=[c[0] for c in BAD_TABLES]
)
def test_bad_tables_exit_2_before_training(
    tmp_path: Path, csv: str, data: str, expected: list[str]
) -> None:
    (tmp_path / "t.csv").write_text(csv)
    extra = data.strip("{}")
    (tmp_path / "w.yaml").write_text(
        f"name: t\nmodel: {{kind: mlp}}\n"
        f"data: {{train: {tmp_path / 't.csv'}, cache_dir: {tmp_path / 'c'}, {extra}}}\n"
    )
    result = CliRunner().invoke(app, ["data", "prepare", str(tmp_path / "w.yaml")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in expected:
        assert fragment in result.output, f"{fragment!r} not in:\n{result.output}"
    assert not list((tmp_path / "c").glob("*/manifest.json"))  # nothing half-prepared kept


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("{train: x.csv, label_column: y, features: [a, y]}", ["data.features", "label column"]),
        ("{train: x.csv, features: [a], categorical: [b]}", ["data.categorical", "['b']"]),
        ("{train: x.csv, features: [a, a]}", ["data.features", "more than once"]),
        ("{train: x, format: text}", ["data.format", "mlp trains on tabular features"]),
    ],
)
def test_bad_tabular_specs_exit_2(tmp_path: Path, data: str, expected: list[str]) -> None:
    (tmp_path / "w.yaml").write_text(f"name: t\nmodel: {{kind: mlp}}\ndata: {data}\n")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "w.yaml")])
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in result.output, f"{fragment!r} not in:\n{result.output}"


def test_a_table_of_one_class_is_a_data_error(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,kind\n1,x\n2,x\n")
    with pytest.raises(DataError, match=r"t\.csv: the label column 'kind'"):
        prepare(_spec(csv, tmp_path, categorical=[]))


def test_mlp_builds_from_the_data_and_takes_its_example() -> None:
    spec = {"kind": "mlp", "hidden_sizes": [8, 4], "activation": "gelu", "batch_norm": True}
    data = DataInfo(num_classes=3, num_features=6)
    model = build_model(spec, data).eval()
    example = input_example(spec, data)
    assert example.shape == (1, 6) and example.dtype == np.float32
    assert model(torch.from_numpy(example)).shape == (1, 3)
    linear = build_model({"kind": "mlp", "hidden_sizes": []}, data)  # logistic regression
    assert sum(p.numel() for p in linear.parameters()) == 6 * 3 + 3


def test_sweeps_may_target_roc_auc_of_an_mlp() -> None:
    raw = {
        "name": "w",
        "model": {"kind": "mlp"},
        "data": {"train": "x.csv"},
        "tune": {"metric": "eval_roc_auc", "space": {"train.optimizer.lr": {"grid": [0.1]}}},
    }
    assert WorkloadSpec.model_validate(raw).tune is not None


def _rank_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney: the positives' mean rank among all (ties averaged), normalized."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos, neg = labels.sum(), len(labels) - labels.sum()
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_auc_matches_the_rank_based_auc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 3000)
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1, 3000) + 1.2 * labels)))  # overlapping classes
    exact = _rank_auc(scores, labels)
    # Three "workers'" histograms, summed as the all-reduce sums them.
    parts = np.array_split(np.arange(3000), 3)
    summed = sum(score_histogram(torch.tensor(scores[p]), torch.tensor(labels[p])) for p in parts)
    assert summed.shape == (2, AUC_BINS) and summed.sum() == 3000
    assert roc_auc(summed) == pytest.approx(exact, abs=1e-3)
    assert 0.7 < exact < 0.9


def test_histogram_auc_edges() -> None:
    perfect = score_histogram(torch.tensor([0.1, 0.2, 0.8, 0.99]), torch.tensor([0, 0, 1, 1]))
    assert roc_auc(perfect) == 1.0
    inverted = score_histogram(torch.tensor([0.9, 0.1]), torch.tensor([0, 1]))
    assert roc_auc(inverted) == 0.0
    tied = score_histogram(torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))
    assert roc_auc(tied) == 0.5
    assert roc_auc(score_histogram(torch.tensor([0.3, 0.7]), torch.tensor([1, 1]))) is None
