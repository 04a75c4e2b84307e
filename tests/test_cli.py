"""The CLI in-process (typer's CliRunner) and once as a real subprocess."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "workloads").glob("*.yaml")) + sorted(
    (ROOT / "workloads/local").glob("*.yaml")
)
runner = CliRunner()


def test_shipped_workloads_exist() -> None:
    names = {p.relative_to(ROOT / "workloads").as_posix() for p in SHIPPED}
    assert {"bert_pretrain.yaml", "gpt_pretrain.yaml", "resnet50_imagenet.yaml"} <= names
    assert {"local/bert_tiny.yaml", "local/mnist_cnn.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_workload_validates(path: Path) -> None:
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"ok: {path}")


def test_validate_many_reports_each(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nmodel: {kind: cnn}\n")
    result = runner.invoke(app, ["validate", str(SHIPPED[0]), str(bad)])
    assert result.exit_code == 2
    assert f"ok: {SHIPPED[0]}" in result.output
    assert f"{bad}: data: required field is missing" in result.output
    assert "1 of 2 workload(s) invalid" in result.output


def test_validate_set_applies_to_every_file() -> None:
    result = runner.invoke(app, ["validate", *map(str, SHIPPED), "--set", "scaling.num_workers=0"])
    assert result.exit_code == 2
    assert result.output.count("scaling.num_workers: Input should be greater than 0") == len(
        SHIPPED
    )


def test_show_prints_resolved_spec_with_defaults_and_overrides() -> None:
    result = runner.invoke(
        app, ["show", str(ROOT / "workloads/bert_pretrain.yaml"), "--set", "train.seed=7"]
    )
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["seed"] == 7  # --set
    assert shown["deepspeed"]["zero_stage"] == 2  # from base/transformer_lm.yaml
    assert shown["scaling"]["max_failures"] == 3  # from base/common.yaml
    assert shown["data"]["shuffle_buffer"] == 2048  # a default
    assert "extends" not in shown
    assert list(shown) == [
        "name",
        "model",
        "data",
        "train",
        "deepspeed",
        "scaling",
        "tune",
        "cv",
        "export",
        "tracking",
        "cluster",
    ]


def test_show_bad_input_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["show", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "missing.yaml: no such file" in result.output


def test_schema_is_json_schema_of_the_workload() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == "orch workload"
    assert {"extends", "name", "model", "data", "train", "deepspeed", "scaling", "tune"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False


def test_no_arguments_shows_help_and_unknown_command_fails() -> None:
    assert "validate" in runner.invoke(app, []).output
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2


@pytest.mark.parametrize("argv0", [["orch"], [sys.executable, "-m", "orchestrator"]])
def test_real_subprocess(argv0: list[str], tmp_path: Path) -> None:
    if argv0 == ["orch"]:
        exe = shutil.which("orch", path=str(Path(sys.executable).parent))
        assert exe, "the orch console script is not installed next to this python"
        argv0 = [exe]
    ok = subprocess.run(
        [*argv0, "validate", *map(str, SHIPPED)], capture_output=True, text=True, cwd=tmp_path
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("ok: ") == len(SHIPPED)
    bad = tmp_path / "w.yaml"
    bad.write_text("name: t\nmodel: {kind: cnn}\ndata: {train: x}\ntrain: {micro_bach_size: 2}\n")
    failed = subprocess.run([*argv0, "validate", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert re.search(
        r"w\.yaml:4: train\.micro_bach_size: unknown field; did you mean", failed.stderr
    )


def test_readme_commands_are_what_ci_runs() -> None:
    """CI must run exactly the README's install and test commands."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    install = re.search(r"<!-- install -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    test = re.search(r"<!-- test -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert install and test, "README must mark its install and test commands"
    for command in (install.group(1), test.group(1)):
        assert command.strip() in ci, f"{command!r} is not run by .ci/run"
