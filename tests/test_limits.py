"""Hostile or mistaken input is refused up front: YAML bombs, loops and huge files, and run or
sweep names that would leave `train.storage_path` (exit 2, one line, no traceback)."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator import api
from orchestrator.cli import app
from orchestrator.load import SpecError, load_workload
from orchestrator.spec import derived_name, name_problem

MINIMAL = "name: t\nmodel: {kind: cnn}\ndata: {train: data/}\n"
TOO_MANY = "holds more than 100,000 values"


def _bomb(levels: int, mappings: bool = False) -> str:
    """Nine-way nested aliases under the free-form deepspeed.extra: 9**levels leaves in a few
    hundred bytes ("billion laughs")."""

    def node(items: list[str]) -> str:
        if mappings:
            return "{" + ", ".join(f"k{i}: {item}" for i, item in enumerate(items)) + "}"
        return "[" + ", ".join(items) + "]"

    lines = [MINIMAL + "deepspeed:\n  extra:", f"    l0: &l0 {node(['x'] * 9)}"]
    lines += [f"    l{i}: &l{i} {node([f'*l{i - 1}'] * 9)}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _cli(tmp_path: Path, text: str, *args: str) -> tuple[int, str]:
    (tmp_path / "w.yaml").write_text(text, encoding="utf-8")
    result = CliRunner().invoke(app, [*args[:1], str(tmp_path / "w.yaml"), *args[1:]])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path: Path) -> None:
    # Nine levels of mappings: expanding them (as the line index of every key did) needs
    # gigabytes, so under a 1 GiB address space only a loader that never expands them passes.
    (tmp_path / "w.yaml").write_text(_bomb(9, mappings=True))
    assert (tmp_path / "w.yaml").stat().st_size < 2000
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "validate", str(tmp_path / "w.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_limit_memory,
    )
    assert time.monotonic() - started < 30
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert "w.yaml:" in errors[0] and TOO_MANY in errors[0] and "aliases" in errors[0]


def test_list_bomb_in_a_free_form_field_is_refused_by_validate_and_show(tmp_path: Path) -> None:
    for command in ("validate", "show"):
        code, output = _cli(tmp_path, _bomb(6), command)
        assert code == 2, output
        assert TOO_MANY in output


def test_what_validate_accepts_show_prints_promptly(tmp_path: Path) -> None:
    # 9**5 leaves: under the limit, so valid, and `show` expands all of them.
    code, _ = _cli(tmp_path, _bomb(5), "validate")
    assert code == 0
    started = time.monotonic()
    code, output = _cli(tmp_path, _bomb(5), "show")
    assert code == 0
    assert output.count("\n") > 9**5
    assert time.monotonic() - started < 30
    # One level more is over the limit: refused before anything is built.
    assert _cli(tmp_path, _bomb(6), "validate")[0] == 2


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("    a: &a [*a]\n", "aliases must not loop"),
        ("    a: &a {b: *a}\n", "aliases must not loop"),
        ("    a: " + "[" * 400 + "]" * 400 + "\n", "nests deeper than 64 levels"),
    ],
    ids=["list-loop", "mapping-loop", "deep"],
)
def test_looping_or_deep_yaml_is_refused(tmp_path: Path, extra: str, expected: str) -> None:
    for command in ("validate", "show"):
        code, output = _cli(tmp_path, MINIMAL + "deepspeed:\n  extra:\n" + extra, command)
        assert code == 2, output
        assert "w.yaml:" in output and expected in output
        assert "RecursionError" not in output


def test_bomb_in_a_set_override_is_refused(tmp_path: Path) -> None:
    levels = ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 7))
    value = f"[&l0 [{', '.join(['x'] * 9)}], {levels}]"
    code, output = _cli(tmp_path, MINIMAL, "validate", "--set", f"deepspeed.extra.x={value}")
    assert code == 2, output
    assert "--set deepspeed.extra.x=" in output and TOO_MANY in output


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    # Cut at the limit, "é" is half a character: still reported as too big, not as not UTF-8.
    code, output = _cli(tmp_path, MINIMAL + "#" + "é" * (1 << 19) + "\n", "validate")
    assert code == 2, output
    assert "w.yaml: is over 1 MiB" in output


# ---------------------------------------------------------------------------------- names
def test_workload_name_outside_the_rule_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_text(MINIMAL.replace("name: t", "name: ../evil"))
    with pytest.raises(SpecError) as caught:
        load_workload(tmp_path / "w.yaml")
    [problem] = caught.value.problems
    assert (problem.path, problem.line) == ("name", 1)
    assert "'../evil' is not a valid name" in problem.message
    assert "letters, digits" in problem.message
    code, output = _cli(tmp_path, MINIMAL, "validate", "--set", "name=a..b")
    assert code == 2 and "name: 'a..b' is not a valid name" in output


def test_legal_names_pass(tmp_path: Path) -> None:
    longest = "r" * 128
    for name in ("bert-tiny", "Run_2.v3", longest):
        code, output = _cli(tmp_path, MINIMAL.replace("name: t", f"name: {name}"), "validate")
        assert code == 0, output
    assert name_problem("r" * 129) is not None
    # A sweep's best workload is named after the sweep: it fits even for the longest name.
    assert name_problem(derived_name(longest, "-best")) is None


def _sandbox(tmp_path: Path, text: str = MINIMAL) -> Path:
    """A workload whose storage_path is two levels down, so `../../x` would land in tmp_path."""
    (tmp_path / "w.yaml").write_text(
        text + f"train: {{storage_path: {tmp_path / 'a' / 'b' / 'runs'}}}\n"
    )
    return tmp_path / "w.yaml"


def test_run_with_a_bad_name_fails_before_ray(tmp_path: Path) -> None:
    workload = _sandbox(tmp_path)
    # A real process, so that whether Ray was imported at all says whether it could have started.
    probe = (
        "import runpy, sys\n"
        "try:\n"
        "    runpy.run_module('orchestrator', run_name='__main__')\n"
        "finally:\n"
        "    print('ray imported:', 'ray' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "run", str(workload), "--name", "../../x"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "error: --name: '../../x' is not a valid name" in done.stderr
    assert "ray imported: False" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.yaml"]


def test_tune_and_submit_refuse_a_bad_name(tmp_path: Path) -> None:
    sweep = MINIMAL + "tune: {space: {train.optimizer.lr: {loguniform: [1.0e-5, 1.0e-1]}}}\n"
    workload = _sandbox(tmp_path, sweep)
    for args in (
        ["tune", str(workload), "--name", "../../x"],
        ["run", str(workload), "--name", "../../x"],  # a sweep, through orch run
        ["submit", str(workload), "--name", "a/b", "--address", "http://127.0.0.1:9"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "error: --name:" in result.output and "is not a valid name" in result.output
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.yaml"]


def test_api_refuses_a_bad_name_before_starting_anything(tmp_path: Path) -> None:
    spec = load_workload(_sandbox(tmp_path))
    with pytest.raises(SpecError, match="is not a valid name"):
        api.run(spec, name="../x")
    with pytest.raises(SpecError, match="is not a valid name"):
        api.submit(spec, name="", address="http://127.0.0.1:9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.yaml"]
