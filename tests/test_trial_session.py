"""A sweep trial that trains in its own process keeps its checkpoints as a Train run does
(unit: no Ray needed for the session's files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.sweeps.trial import _final_report
from orchestrator.train.checkpoint import Manifest, write_manifest
from orchestrator.train.session import REPORT, TrialSession, checkpoint_dirs


def _checkpoint(tmp: Path, step: int) -> str:
    """A checkpoint directory as the loop writes one: state, then the manifest."""
    directory = tmp / f"written-{step}"
    (directory / "zero").mkdir(parents=True)
    (directory / "zero" / "shard.pt").write_bytes(b"shard")
    (directory / "state.pt").write_bytes(b"state %d" % step)
    write_manifest(str(directory), Manifest(step, 0, step, 1, None, "fp32", "hash", {}))
    return str(directory)


def _session(run_dir: Path, keep: int | None, seen: list[Any]) -> TrialSession:
    return TrialSession(
        str(run_dir),
        datasets={},
        keep=keep,
        to_tune=lambda metrics, uri: seen.append((metrics["step"], uri)),
        device=torch.device("cpu"),
    )


def test_checkpoints_persist_like_a_train_run_and_old_ones_go(tmp_path: Path) -> None:
    run_dir, seen = tmp_path / "trial_1" / "train", []
    session = _session(run_dir, keep=2, seen=seen)
    session.report({"step": 1, "loss": 2.0}, None, 1)  # no checkpoint: nothing on disk
    assert not run_dir.exists() and seen == [(1, None)]
    for step in (2, 4, 6):
        session.report({"step": step, "total_steps": 6}, _checkpoint(tmp_path, step), step)
    kept = [f"{run_dir}/step-00000004", f"{run_dir}/step-00000006"]
    assert checkpoint_dirs(str(run_dir)) == kept
    assert sorted(p.name for p in run_dir.iterdir()) == ["step-00000004", "step-00000006"]
    assert seen[1:] == [(2, f"{run_dir}/step-00000002"), (4, kept[0]), (6, kept[1])]
    last = Path(kept[1])
    assert (last / "state.pt").read_bytes() == b"state 6"
    assert (last / "zero" / "shard.pt").read_bytes() == b"shard"
    resumed = session.resume_from()
    assert resumed is not None and resumed.path == kept[1]
    # The run's last report travels with its checkpoint: a trial restarted after its run
    # ended tells Tune the result again instead of training on.
    assert _final_report(kept[1]) == {"step": 6, "total_steps": 6}
    assert _final_report(kept[0]) is None  # not the last step


def test_a_copy_cut_short_is_no_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "train"
    session = _session(run_dir, keep=None, seen=[])
    session.report({"step": 2}, _checkpoint(tmp_path, 2), 2)
    torn = run_dir / "step-00000004"  # the trial died while copying: no manifest yet
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"half")
    (torn / REPORT).write_text('{"step": 4, "total_steps": 4}')
    assert checkpoint_dirs(str(run_dir)) == [f"{run_dir}/step-00000002"]
    resumed = session.resume_from()
    assert resumed is not None and resumed.path.endswith("step-00000002")
    assert checkpoint_dirs(str(tmp_path / "nothing-here")) == []
