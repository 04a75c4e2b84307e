"""Sweeps: the search space and sample checks (unit), and real Ray Tune sweeps of tiny MNIST CNNs.

The integration sweeps keep each trial to a few steps of a tiny CNN with one quarter-CPU
worker, so six trials finish in well under a minute on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from builders import tiny_sweep
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.data import prepare
from orchestrator.driver import RunError
from orchestrator.load import load_workload
from orchestrator.spec import Domain, WorkloadSpec
from orchestrator.sweeps import SweepResult, run_sweep
from orchestrator.sweeps.space import param_space, pbt_mutations
from orchestrator.sweeps.trial import SampleError, TrialSetup, resolve

TESTS = Path(__file__).resolve().parent


def reported(result: SweepResult) -> dict[str, list[dict[str, Any]]]:
    """Every result Tune wrote for each trial (result.json), read independently of orch."""
    out = {}
    for trial_dir in Path(result.path).glob("trial_*"):
        lines = (trial_dir / "result.json").read_text().splitlines()
        out[trial_dir.name.removeprefix("trial_")] = [json.loads(line) for line in lines]
    return out


# --------------------------------------------------------------------------- unit, no Ray
def test_search_space_becomes_tune_domains() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    space = {
        "train.optimizer.lr": Domain(loguniform=(1e-5, 1e-3)),
        "model.dropout": Domain(uniform=(0.0, 0.5)),
        "train.micro_batch_size": Domain(randint=(8, 33)),
        "model.channels": Domain(choice=[[8, 16], [16, 32]]),
        "train.seed": Domain(grid=[1, 2, 3]),
    }
    tune_space = param_space(space)
    lr = tune_space["train.optimizer.lr"]
    assert isinstance(lr, Float) and lr.lower == 1e-5 and lr.upper == 1e-3
    samples = [lr.sample() for _ in range(2000)]
    assert all(1e-5 <= x < 1e-3 for x in samples)
    # Log scale: half below the geometric middle 1e-4 (a uniform draw: under 5%).
    assert 0.4 < sum(x < 1e-4 for x in samples) / len(samples) < 0.6
    assert isinstance(tune_space["model.dropout"], Float)
    batch = tune_space["train.micro_batch_size"]
    assert isinstance(batch, Integer) and {batch.sample() for _ in range(500)} <= set(range(8, 33))
    assert isinstance(tune_space["model.channels"], Categorical)
    assert tune_space["train.seed"] == {"grid_search": [1, 2, 3]}
    mutations = pbt_mutations(space)
    assert mutations["train.seed"] == [1, 2, 3] and mutations["model.channels"] == [
        [8, 16],
        [16, 32],
    ]
    assert isinstance(mutations["train.optimizer.lr"], Float)


def test_samples_are_validated_as_workloads(tmp_path: Path) -> None:
    spec = tiny_sweep(tmp_path, tmp_path, tmp_path)
    good = resolve(spec, {"train.optimizer.lr": 3e-4, "model.channels": [4, 8]})
    assert good.train.optimizer.lr == 3e-4 and good.model.channels == [4, 8]
    assert good.tune is None and good.name == "sweep"
    with pytest.raises(SampleError, match=r"train\.optimizer\.lr: Input should be greater than 0"):
        resolve(spec, {"train.optimizer.lr": -1.0})
    with pytest.raises(SampleError, match=r"global_batch_size: 48 is not divisible"):
        resolve(spec, {"train.global_batch_size": 48, "train.micro_batch_size": 32})


def test_space_values_no_trial_could_run_with_are_refused(tmp_path: Path) -> None:
    base = tiny_sweep(tmp_path, tmp_path, tmp_path).model_dump(mode="json")

    def problems(space: dict[str, Any], **tune: Any) -> str:
        raw = base | {"tune": base["tune"] | {"space": space} | tune}
        with pytest.raises(ValueError) as err:
            WorkloadSpec.model_validate(raw)
        return str(err.value)

    assert "values near the high bound 1.5 are invalid" in problems(
        {"train.optimizer.momentum": {"uniform": [0.5, 1.5]}}
    )
    assert "value 'adam' is invalid" in problems({"train.optimizer.name": {"choice": ["adam"]}})
    assert "did you mean train.optimizer.lr?" in problems({"train.optimizer.lrr": {"choice": [1]}})
    assert "prepared once" in problems({"data.limit": {"choice": [100, 200]}})
    # Valid together: each hidden size with some head count of the space.
    ok = base | {
        "model": {"kind": "bert_mlm"},
        "data": base["data"] | {"format": "text"},
        "tune": base["tune"]
        | {
            "space": {
                "model.hidden_size": {"choice": [64, 96]},
                "model.num_heads": {"grid": [4, 8]},
            }
        },
    }
    WorkloadSpec.model_validate(ok)


def test_bad_sweep_exits_2_with_file_field_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: t\nmodel: {kind: cnn}\ndata: {train: x}\ntune:\n  space:\n"
        "    train.micro_batch_size: {uniform: [8, 64]}\n"
    )
    result = CliRunner().invoke(app, ["tune", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml:6: tune.space.train.micro_batch_size" in result.output
    assert "valid integer" in result.output and "Traceback" not in result.output
    plain = tmp_path / "plain.yaml"
    plain.write_text("name: t\nmodel: {kind: cnn}\ndata: {train: x}\n")
    result = CliRunner().invoke(app, ["tune", str(plain)])
    assert result.exit_code == 2 and "no tune section" in result.output


# --------------------------------------------------------------------------- real sweeps
# Each trial is a whole Ray Train run (about 20 s of start-up on two cores), so one sweep is
# looked at from several sides rather than run once per test.


@pytest.mark.integration
def test_trials_share_the_planned_splits_unless_they_sample_their_own_order(
    local_ray: None, shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    """The sweep plans the Parquet reads once; a trial with another seed plans its own."""
    from orchestrator.data import open_splits
    from orchestrator.train.trainer import prepare_run

    spec = tiny_sweep(shared_data, data_cache, tmp_path, "data.shard_rows=1000")
    run = prepare_run(spec, address=None, verbose=False, log=lambda _: None)
    planned = open_splits(run.prepared, seed=spec.train.seed)
    setup = TrialSetup(spec=spec, run=run, sweep_path=str(tmp_path), janitor=None, datasets=planned)
    assert setup.splits_for(spec.sampled({"train.optimizer.lr": 0.01})) is planned
    reseeded = spec.sampled({"train.seed": spec.train.seed + 1})
    own = setup.splits_for(reseeded)

    def order(splits: dict[str, Any]) -> list[int]:
        rows = splits["train"].select_columns(["sample_id"]).iter_rows()
        return [row["sample_id"] for row in rows]

    assert order(own) == order(open_splits(run.prepared, seed=reseeded.train.seed))
    assert order(own) != order(planned)


@pytest.fixture(scope="module")
def asha(
    local_ray: None,
    shared_data: Path,
    data_cache: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[WorkloadSpec, SweepResult, list[str]]:
    """Six trials, Optuna sampling, ASHA stopping, MLflow tracking, and one outage.

    Two evaluations per trial (steps 3 and 6): ASHA can stop a trial after its first. While the
    sweep starts, a data shard is missing (a storage hiccup); it is back when Tune retries.
    One trial at a time: ASHA stops a trial that reaches a rung worse than the trials before it,
    so which trials it stops depends on the order they arrive. Run together, that order is the
    machine's timing (a CI run once saw them arrive worst first, and ASHA rightly stopped none);
    one at a time it is the seeded searcher's, and the sweep stops the same trials every run.
    """
    root = tmp_path_factory.mktemp("asha")
    spec = tiny_sweep(
        shared_data,
        data_cache,
        root,
        "tune.num_samples=6",
        "tune.search=optuna",
        "tune.scheduler={kind: asha, grace_period: 1, reduction_factor: 2}",
        "tune.max_retries=1",
        "tune.max_concurrent_trials=1",
        "train.max_steps=6",
        "train.eval_every=3",
        "tracking.mlflow.enabled=true",
        "tracking.mlflow.experiment=sweeps",
        "export=[torchscript]",
    )
    lines: list[str] = []
    hidden: list[tuple[Path, Path]] = []

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("starting sweep"):
            # This sweep's own shards: the session's cache holds other tests' data too.
            prepared = Path(prepare(spec.data).root)
            shard = sorted(prepared.glob("train/*.parquet"))[0]
            hidden.append((shard, shard.rename(shard.with_suffix(".away"))))
        if "failed; retrying it" in line and hidden:
            shard, away = hidden.pop()
            away.rename(shard)

    try:
        return spec, run_sweep(spec, log=log), lines
    finally:  # the cache is the session's: never leave a shard away
        for shard, away in hidden:
            away.rename(shard)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_asha_stops_bad_trials_early_and_reports_the_true_best(
    asha: tuple[WorkloadSpec, SweepResult, list[str]],
) -> None:
    spec, result, _ = asha
    assert len(result.trials) == 6
    stopped = [r for r in result.trials if r.status == "STOPPED"]
    assert stopped, [(r.params, r.metric, r.status) for r in result.trials]
    by_trial = reported(result)
    for row in stopped:  # stopped after the first evaluation, with steps left to train
        assert row.iterations == 1 and row.step == 3
        assert by_trial[row.trial_id][-1]["total_steps"] == 6
    done = [r for r in result.trials if r.status == "DONE"]
    assert done and all(r.iterations == 2 and r.step == 6 for r in done)
    # FIFO runs every sampled trial to its last evaluation: 6 trials x 2.
    assert sum(r.iterations for r in result.trials) < 6 * 2
    # The best is the best of every trial's last report, as Tune wrote them down.
    last = {t: rows[-1]["eval_loss"] for t, rows in by_trial.items()}
    true_best = min(last, key=last.__getitem__)
    assert result.best is not None and result.best.trial_id == true_best
    assert result.best.metric == pytest.approx(last[true_best])
    # The best config as a workload to run: the best values, no tune section, a new name.
    best = load_workload(result.best_workload)
    assert best.tune is None and best.name == "sweep-best"
    assert best.train.optimizer.lr == pytest.approx(result.best.params["train.optimizer.lr"])
    assert best.model == spec.model and best.data == spec.data
    assert result.model_dir is not None and (Path(result.model_dir) / "state_dict.pt").is_file()
    # The workload's `export:` formats: the best trial's model, checked against eager.
    assert (Path(result.model_dir) / "model.torchscript.pt").is_file()


@pytest.mark.integration
def test_optuna_samples_the_space(asha: tuple[WorkloadSpec, SweepResult, list[str]]) -> None:
    import pickle

    _, result, _ = asha
    lrs = [r.params["train.optimizer.lr"] for r in result.trials]
    assert len(set(lrs)) == 6 and all(1e-5 <= lr < 1e-1 for lr in lrs)
    # Optuna's own study (saved with the sweep) suggested exactly these values.
    (saved,) = Path(result.path).glob("searcher-state-*.pkl")
    study = pickle.loads(saved.read_bytes())["_ot_study"]
    suggested = sorted(t.params["train.optimizer.lr"] for t in study.trials)
    assert suggested == pytest.approx(sorted(lrs))


@pytest.mark.integration
def test_failing_trial_is_retried_and_the_sweep_finishes(
    asha: tuple[WorkloadSpec, SweepResult, list[str]],
) -> None:
    _, result, lines = asha
    # The trials that started while the shard was away failed, each once: their retry ran.
    retried = [line.split()[1] for line in lines if "failed; retrying it" in line]
    assert retried and len(retried) == len(set(retried)), lines
    assert all(r.status != "ERROR" for r in result.trials)


@pytest.mark.integration
def test_sweep_tracks_one_parent_run_with_a_nested_run_per_trial(
    asha: tuple[WorkloadSpec, SweepResult, list[str]],
) -> None:
    from mlflow.tracking import MlflowClient

    _, result, _ = asha
    client = MlflowClient()
    parent = client.get_run(result.mlflow_run_id)
    assert parent.data.tags["orch.kind"] == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.tags["orch.best_trial"] == result.best.trial_id
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(result.best.metric)
    assert parent.data.metrics["export_torchscript_max_abs_diff"] < 1e-4  # the best's export
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    by_trial = {c.data.tags["orch.trial_id"]: c for c in children}
    assert len(children) == 6 and set(by_trial) == {r.trial_id for r in result.trials}
    for row in result.trials:
        child = by_trial[row.trial_id]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["train.optimizer.lr"]) == pytest.approx(
            row.params["train.optimizer.lr"]
        )
        history = client.get_metric_history(child.info.run_id, "eval_loss")
        assert [m.step for m in history] == [3, 6][: row.iterations]
        assert history[-1].value == pytest.approx(row.metric)


@pytest.mark.integration
def test_finished_sweep_resumes_and_is_not_silently_restarted(
    asha: tuple[WorkloadSpec, SweepResult, list[str]],
) -> None:
    spec, result, _ = asha
    again = run_sweep(spec, resume=True, tracking=False)
    assert {(r.trial_id, r.metric) for r in again.trials} == {
        (r.trial_id, r.metric) for r in result.trials
    }
    with pytest.raises(RunError, match=r"already exists .*--resume"):
        run_sweep(spec, resume=False, tracking=False)
    longer = spec.train.model_copy(update={"max_steps": 10})
    with pytest.raises(RunError, match=r"workload changed .*train\.max_steps"):
        run_sweep(spec.model_copy(update={"train": longer}), resume=True, tracking=False)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_pbt_restores_trials_from_checkpoints_it_exploits(
    local_ray: None, shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    spec = tiny_sweep(
        shared_data,
        data_cache,
        tmp_path,
        "tune.num_samples=1",
        "tune.scheduler={kind: pbt, perturbation_interval: 4}",
        # One trial that cannot learn, one that can: PBT copies the good one's weights.
        "tune.space={train.optimizer.lr: {grid: [1.0e-6, 3.0e-3]}}",
        # PBT compares a trial with the others' last reports: the two must train at the same
        # time, long enough that one starting a few seconds late still overlaps the other
        # (a step of this CNN takes about 15 ms); each exploit restarts a trial, so only every
        # fourth checkpoint is a chance to.
        "train.max_steps=48",
        "train.checkpoint_every=2",
    )
    result = run_sweep(spec)
    assert {r.status for r in result.trials} == {"DONE"}
    exploits = [
        (trial, row)
        for trial, rows in reported(result).items()
        for row in rows
        if row.get("restored_from") not in (None, f"trial_{trial}")  # another trial's
    ]
    steps = {
        t: [(r["step"], r.get("restored_from")) for r in rows]
        for t, rows in reported(result).items()
    }
    assert exploits, f"no trial was restored from a checkpoint of another trial: {steps}"
    trial, first = exploits[0]
    # Training went on from the exploited checkpoint's step, not from step 0.
    assert first["step"] > 2
    assert list((Path(result.path) / f"trial_{trial}").glob("train-*/step-*"))


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_trials_with_several_workers_run_a_torch_trainer_and_free_its_workers(
    local_ray: None, shared_data: Path, data_cache: Path, tmp_path: Path
) -> None:
    """One-worker trials train in their own process (the sweeps above); a trial with two
    workers starts a TorchTrainer, and what its workers held is freed when the sweep ends."""
    from ray.util import placement_group_table

    spec = tiny_sweep(
        shared_data,
        data_cache,
        tmp_path,
        "tune.num_samples=1",
        "scaling.num_workers=2",
        "scaling.resources_per_worker={CPU: 0.25}",
        "train.max_steps=4",
        "train.checkpoint_every=2",
    )
    result = run_sweep(spec, tracking=False)
    (row,) = result.trials
    assert row.status == "DONE" and row.step == 4 and row.metric is not None
    run_dir = Path(result.path) / f"trial_{row.trial_id}" / "train"
    assert row.checkpoint == str(run_dir / "step-00000004")
    assert result.model_dir == str(run_dir / "model")
    assert (run_dir / "model" / "state_dict.pt").is_file()
    # Two workers ran: the checkpoint's manifest says so (a one-worker trial's says 1).
    manifest = json.loads((run_dir / "step-00000004" / "orch_checkpoint.json").read_text())
    assert manifest["world_size"] == 2
    held = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
    assert held == [], held
