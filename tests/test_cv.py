"""k-fold cross-validation without Ray: the fold rule, the cv section's checks, its sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from builders import LOCAL
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.data.folds import Fold, fold_filter, fold_of, fold_sizes
from orchestrator.data.prepare import PreparedData
from orchestrator.data.shards import held_out
from orchestrator.data.sources import DataError
from orchestrator.load import load_workload
from orchestrator.spec import fold_workloads
from orchestrator.sweeps.cv import CVResult, FoldRow, cv_lines, sweep_of

MINIMAL = "name: t\nmodel: {kind: cnn}\ndata: {train: data/}\n"


def test_every_id_is_in_exactly_one_eval_fold_and_the_train_split_of_the_others() -> None:
    ids = np.random.default_rng(0).choice(10**12, size=3000, replace=False)
    table = pa.table({"sample_id": pa.array(ids, pa.int64())})
    folds = fold_of(ids, 5)
    assert set(folds.tolist()) == set(range(5))
    evaluated: list[int] = []
    for i in range(5):
        fold = Fold(i, 5)
        eval_ids = pads.dataset(table).to_table(filter=fold_filter(fold, "eval"))["sample_id"]
        train_ids = pads.dataset(table).to_table(filter=fold_filter(fold, "train"))["sample_id"]
        assert sorted(eval_ids.to_pylist()) == sorted(ids[folds == i].tolist())
        assert set(train_ids.to_pylist()) == set(ids.tolist()) - set(eval_ids.to_pylist())
        evaluated += eval_ids.to_pylist()
    assert sorted(evaluated) == sorted(ids.tolist())  # each id once, none left out


def test_folds_are_deterministic_and_do_not_depend_on_order() -> None:
    ids = np.arange(1000)
    shuffled = np.random.default_rng(1).permutation(ids)
    assert (fold_of(ids, 7) == fold_of(ids, 7)).all()
    assert (fold_of(shuffled, 7) == fold_of(ids, 7)[shuffled]).all()
    # The rule is a fixed function of the id: pinned, so a fold means the same in every version.
    assert fold_of([0, 1, 2, 3, 10**12, -1], 5).tolist() == [4, 2, 2, 0, 4, 4]


def test_folds_are_balanced_even_on_the_ids_left_after_the_eval_split() -> None:
    # The eval split was held out by another hash of the same ids; the rest must still mix.
    ids = np.array([i for i in range(25_000) if not held_out(i, 0.2)])
    for k in (2, 5, 10):
        sizes = np.bincount(fold_of(ids, k), minlength=k)
        assert np.abs(sizes / (len(ids) / k) - 1).max() < 0.06, (k, sizes)


def test_fold_sizes_count_the_train_shards(tmp_path: Path) -> None:
    for n, (start, stop) in enumerate([(0, 300), (300, 700)]):
        ids = pa.array(np.arange(start, stop), pa.int64())
        pq.write_table(pa.table({"sample_id": ids}), tmp_path / f"part-{n}.parquet")
    shards = ["part-0.parquet", "part-1.parquet"]
    manifest = {"kind": "image", "splits": {"train": {"rows": 700, "shards": shards}}}
    prepared = PreparedData(str(tmp_path), pafs.LocalFileSystem(), manifest)
    sizes = fold_sizes(prepared, 4)
    assert sizes == np.bincount(fold_of(np.arange(700), 4), minlength=4).tolist()
    assert sum(sizes) == 700

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "part-0.parquet")
    with pytest.raises(DataError, match=r"part-0\.parquet: shard has no sample_id column"):
        fold_sizes(prepared, 4)


CV = "cv: {folds: 5, metric: eval_accuracy}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            MINIMAL + CV + "tune:\n  space:\n    train.seed: {grid: [1, 2]}\n",
            ["bad.yaml:4", "cv: cv and tune cannot be combined", "best_workload.yaml"],
        ),
        (MINIMAL + "cv: {folds: 1}\n", ["bad.yaml:4", "cv.folds", "greater than or equal to 2"]),
        (MINIMAL + "cv: {folds: 101}\n", ["cv.folds", "less than or equal to 100"]),
        (
            MINIMAL + "cv: {metric: accuracy}\n",
            ["cv.metric", "'accuracy' is not an evaluation metric", "eval_accuracy"],
        ),
        (MINIMAL + "cv: {metric: loss}\n", ["cv.metric", "eval_loss"]),
        (
            MINIMAL + CV + "train: {eval_batches: 4}\n",
            ["bad.yaml:5", "train.eval_batches", "every sample of its fold", "null"],
        ),
        (
            "name: t\nmodel: {kind: cnn}\ndata: {train: data/, limit: 3}\n" + CV,
            ["cv.folds", "5 folds of at most 3 records (data.limit)", "at most 3 folds"],
        ),
        (MINIMAL + "cv: {folds: 3, fold: 3}\n", ["cv.fold", "3 is not a fold of 3", "0 to 2"]),
        (MINIMAL + "cv: {folds: 3, mode: up}\n", ["cv.mode", "'min' or 'max'"]),
    ],
    ids=[
        "with-tune",
        "one-fold",
        "too-many-folds",
        "not-a-metric",
        "training-metric",
        "partial-evaluation",
        "more-folds-than-limit",
        "fold-out-of-range",
        "bad-mode",
    ],
)
def test_bad_cv_sections_exit_2_naming_file_and_field(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in expected:
        assert fragment in result.output, f"{fragment!r} not in:\n{result.output}"


def test_a_cv_is_a_grid_sweep_over_its_folds() -> None:
    spec = load_workload(LOCAL / "mnist_cnn.yaml", ["cv={folds: 4, metric: eval_accuracy}"])
    assert spec.cv is not None and spec.cv.direction() == "max"
    sweep = sweep_of(spec)
    assert sweep.tune is not None
    assert (sweep.tune.metric, sweep.tune.mode, sweep.tune.search) == (
        "eval_accuracy",
        "max",
        "grid",
    )
    assert sweep.tune.space["cv.fold"].grid == [0, 1, 2, 3]
    assert sweep.tune.num_samples == 1
    # Each trial's workload: the fold set, no tune section, valid on its own.
    trial = sweep.sampled({"cv.fold": 2})
    assert trial.tune is None and trial.cv is not None and trial.cv.fold == 2
    assert [w.cv.fold for w in fold_workloads(spec) if w.cv] == [0, 1, 2, 3]

    one = load_workload(LOCAL / "mnist_cnn.yaml", ["cv={folds: 4, fold: 1}"])
    assert one.cv is not None and one.cv.direction() == "min"  # eval_loss, by default
    assert sweep_of(one).tune.space["cv.fold"].grid == [1]  # type: ignore[union-attr]


def test_orch_run_api_points_a_cv_workload_to_cross_validate() -> None:
    import orchestrator as orch
    from orchestrator.errors import RunError

    with pytest.raises(RunError, match="cross_validate"):
        orch.run(LOCAL / "mnist_cnn.yaml", ["cv={folds: 3}"])


def test_cv_lines_show_each_fold_and_the_mean_and_std() -> None:
    folds = [
        FoldRow(0, "a_00000", "DONE", 90, 10, {"eval_accuracy": 0.9, "eval_loss": 0.3}),
        FoldRow(1, "a_00001", "DONE", 91, 9, {"eval_accuracy": 0.8, "eval_loss": 0.5}),
    ]
    result = CVResult(
        name="t",
        path="/runs/t",
        metric="eval_accuracy",
        mode="max",
        mean=0.85,
        std=0.05,
        folds=folds,
        summary={"eval_accuracy": (0.85, 0.05), "eval_loss": (0.4, 0.1)},
        seconds=3.0,
    )
    lines = cv_lines(result)
    assert lines[0].split() == [
        "fold",
        "trial",
        "train",
        "eval",
        "eval_accuracy",
        "eval_loss",
        "status",
    ]
    assert lines[1].split() == ["0", "a_00000", "90", "10", "0.9", "0.3", "DONE"]
    assert "eval_accuracy: 0.85 +- 0.05" in lines
    assert "eval_loss: 0.4 +- 0.1" in lines
