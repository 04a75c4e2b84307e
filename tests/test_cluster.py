"""`orch submit` and the job lifecycle against real Ray clusters on this machine.

The cluster is `cluster/local_cluster.sh`'s: a `ray start --head` with token auth and a second
`ray start` node with its own resources. orch runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import MlflowServer

from orchestrator.jobs.connect import JobsError, find_token, resolve_address
from orchestrator.plan import Unschedulable, check_fit
from orchestrator.spec import ScalingSpec

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "cluster" / "local_cluster.sh"
BERT = "workloads/local/bert_tiny.yaml"
# A one-layer BERT for a few steps: the job is about the cluster, not the model.
TINY = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "train.max_steps=6",
    "train.scheduler.warmup_steps=1",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.checkpoint_every=3",
    "train.log_every=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    url: str
    token_path: Path
    directory: Path
    env: dict[str, str]  # the script's settings: the same ports and token on a restart

    def script(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), command], env=self.env, capture_output=True, text=True,
            timeout=240,
        )  # fmt: skip

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()


def _client_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no Ray or orch address or token unless given."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "ORCH_ADDRESS"))
    }
    env.update(extra)
    return env


def orch(*args: str, env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # Short: Ray's unix socket paths live under it and must stay below ~107 characters.
    directory = Path(tempfile.mkdtemp(prefix="oc", dir="/tmp"))
    port = _free_port()
    env = _client_env(
        ORCH_CLUSTER_DIR=str(directory),
        ORCH_DASHBOARD_PORT=str(port),
        ORCH_GCS_PORT=str(_free_port()),
    )
    try:
        started = subprocess.run(
            ["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=240
        )
        assert started.returncode == 0, started.stderr + _logs(directory)
        assert f"export ORCH_ADDRESS=http://127.0.0.1:{port}" in started.stdout
        yield LocalCluster(f"http://127.0.0.1:{port}", directory / "auth_token", directory, env)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


def _logs(directory: Path) -> str:
    return "".join(p.read_text() for p in directory.glob("*.log"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Storage every node reaches (one machine: a local directory), shared by the module's jobs."""
    return tmp_path_factory.mktemp("cluster-storage")


def _with_token(cluster: LocalCluster, **extra: str) -> dict[str, str]:
    return _client_env(
        ORCH_ADDRESS=cluster.url, RAY_AUTH_TOKEN_PATH=str(cluster.token_path), **extra
    )


def _storage(shared: Path, data_cache: Path) -> list[str]:
    """Runs in the module's shared storage; prepared data in the session's cache (every node
    reaches both on one machine), so the corpus is prepared once."""
    return [f"train.storage_path={shared / 'runs'}", f"data.cache_dir={data_cache}"]


def _job_id(output: str) -> str:
    found = re.search(r"^submitted (\S+)$", output, re.M)
    assert found, output
    return found.group(1)


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- jobs that train
@pytest.mark.integration
def test_submit_trains_on_both_nodes_and_tracks(
    cluster: LocalCluster, shared: Path, data_cache: Path, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobSubmissionClient
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    env = _with_token(cluster)
    result = orch(
        "submit",
        BERT,
        *_sets(
            *TINY,
            *_storage(shared, data_cache),
            "scaling.placement_strategy=STRICT_SPREAD",
            f"tracking.mlflow.tracking_uri={mlflow_server.uri}",
        ),
        "--name",
        "both-nodes",
        "--follow",
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = _job_id(result.stdout)
    assert f"dashboard: {cluster.url}/#/jobs/{job_id}" in result.stdout
    assert "step 6/6" in result.stdout and f"{job_id}: SUCCEEDED" in result.stdout
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)

    # The training workers ran on both nodes: Ray's own record of the job's actors.
    headers = {"Authorization": f"Bearer {cluster.token}"}
    ray_job = JobSubmissionClient(cluster.url, headers=headers).get_job_info(job_id).job_id
    state = StateApiClient(cluster.url, headers={"Content-Type": "application/json", **headers})
    workers = state.list(
        StateResource.ACTORS,
        ListApiOptions(
            detail=True, filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job)]
        ),
        raise_on_missing_output=False,
    )
    nodes = state.list(StateResource.NODES, ListApiOptions(), raise_on_missing_output=False)
    assert len(workers) == 2
    assert {w.node_id for w in workers} == {n.node_id for n in nodes}

    # The MLflow run made at submit time is the one the job filled in.
    run = MlflowClient(mlflow_server.uri).get_run(run_id)
    assert run.info.status == "FINISHED", result.stdout
    assert run.data.tags["orch.run_name"] == "both-nodes"
    assert run.data.tags["orch.data_hash"] != "pending"
    assert {"loss", "eval_loss"} <= set(run.data.metrics)
    assert sorted(p.name for p in (shared / "runs" / "both-nodes").glob("step-*"))

    status = orch("status", job_id, env=env)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout
    assert "workload: bert-tiny (run both-nodes)" in status.stdout
    listed = orch("list", env=env)
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    assert "bert-tiny" in row and "SUCCEEDED" in row
    logs = orch("logs", job_id, env=env)
    assert "done: both-nodes" in logs.stdout and "step 6/6" in logs.stdout


@pytest.mark.integration
def test_data_prepare_runs_its_tasks_on_both_nodes(
    cluster: LocalCluster, shared_data: Path, tmp_path: Path
) -> None:
    """`orch data prepare` on a cluster spreads its chunks over the nodes, and the dataset is
    the one the same chunks give one after another in this process.

    It runs as a job on the head node, as on a cluster's own machine: a driver joining from
    outside (`--address`) cannot reach a cluster bound to 127.0.0.1, since Ray rewrites a
    loopback address to the machine's own before connecting."""
    import shlex

    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    from orchestrator.data.formats import FORMATS, TextFormat
    from orchestrator.data.sources import find_source
    from orchestrator.data.text import TextJob, prepare_chunk

    corpus, cache = shared_data / "tinyshakespeare.txt", tmp_path / "cache"
    settings = [f"data.train={corpus}", f"data.cache_dir={cache}", "data.chunk_mb=0.125",
                "data.tokenizer.vocab_size=500", "data.seq_len=32"]  # fmt: skip
    command = [sys.executable, "-m", "orchestrator", "data", "prepare", str(ROOT / BERT)]
    headers = {"Authorization": f"Bearer {cluster.token}"}
    jobs = JobSubmissionClient(cluster.url, headers=headers)
    job = jobs.submit_job(entrypoint=shlex.join(command + _sets(*settings)))
    _wait_for(lambda: jobs.get_job_status(job).is_terminal(), 240, "orch data prepare")
    assert jobs.get_job_status(job) == JobStatus.SUCCEEDED, jobs.get_job_logs(job)
    (manifest_path,) = cache.glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    state = StateApiClient(cluster.url, headers={"Content-Type": "application/json", **headers})
    nodes = state.list(StateResource.NODES, ListApiOptions(), raise_on_missing_output=False)
    assert manifest["chunks"] == 9
    assert set(manifest["chunks_by_node"]) == {n.node_id for n in nodes}, manifest

    fmt = FORMATS["text"]
    assert isinstance(fmt, TextFormat)
    root = manifest_path.parent / manifest["dir"]
    local = pafs.LocalFileSystem()
    job = TextJob("text", "text", 32, 8192, 0.05, (root / "tokenizer.json").read_text(),
                  local, local, str(tmp_path / "one-node"))  # fmt: skip
    reports = [prepare_chunk(c, job) for c in fmt.chunks(find_source(str(corpus)), 1 << 17, 0)]
    for split in ("train", "eval"):
        ours = pa.concat_tables(
            pq.read_table(root / n) for n in manifest["splits"][split]["shards"]
        )
        expected = pa.concat_tables(
            pq.read_table(tmp_path / "one-node" / n) for r in reports for n in r[split]["shards"]
        )
        assert ours.equals(expected), split


@pytest.mark.integration
def test_job_waits_with_a_reason_stops_survives_a_lost_head_and_resumes(
    cluster: LocalCluster, shared: Path, data_cache: Path
) -> None:
    env = _with_token(cluster)
    # Both jobs need the second node's one `node2` slot: the second waits for the first.
    slot = ["scaling.num_workers=1", "scaling.resources_per_worker={CPU: 0.5, node2: 1}"]
    long_job = orch(
        "submit",
        BERT,
        *_sets(*TINY, *slot, *_storage(shared, data_cache), "train.max_steps=100000"),
        "--name",
        "long",
        "--no-tracking",
        env=env,
    )
    assert long_job.returncode == 0, long_job.stderr
    first = _job_id(long_job.stdout)
    _wait_for(lambda: "step 1/" in orch("logs", first, env=env).stdout, 300, "training")
    # A second job of the run name would write the same run directory.
    twice = orch(
        "submit", BERT, *_sets(*TINY, *_storage(shared, data_cache)), "--name", "long",
        "--no-tracking", env=env,
    )  # fmt: skip
    assert twice.returncode == 2, twice.stderr
    assert "run 'long' is already RUNNING" in twice.stderr and first in twice.stderr

    short_job = orch(
        "submit", BERT, *_sets(*TINY, *slot, *_storage(shared, data_cache)), "--name", "short",
        "--no-tracking", env=env,
    )  # fmt: skip
    assert short_job.returncode == 0, short_job.stderr
    second = _job_id(short_job.stdout)
    _wait_for(
        lambda: "waiting for resources" in orch("status", second, env=env).stdout,
        180,
        "orch status to say the job waits",
    )
    waiting = orch("status", second, env=env).stdout
    assert f"{second}: RUNNING" in waiting and "node2 1" in waiting, waiting

    follower = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "logs", second, "--follow"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    notes: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [notes.put(x) for x in follower.stderr], daemon=True).start()
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while not any("waiting for resources" in x for x in seen) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(notes.get(timeout=1))
        assert any(x.startswith("[orch] waiting for resources") for x in seen), seen
        # Stopping the waiting job ends the follow with the job's outcome.
        stopped = orch("stop", second, env=env)
        assert stopped.returncode == 0 and f"{second}: STOPPED" in stopped.stdout
        out = follower.stdout.read()
        follower.wait(timeout=120)
    finally:
        follower.kill()
    assert follower.returncode == 1 and f"{second}: STOPPED" in out, out

    _wait_for(lambda: "step 4/" in orch("logs", first, env=env).stdout, 300, "a checkpoint")
    listed = orch("list", env=env).stdout
    assert re.search(rf"^{first}\s+bert-tiny\s+RUNNING", listed, re.M), listed
    assert re.search(rf"^{second}\s+bert-tiny\s+STOPPED", listed, re.M), listed

    # The head node goes while `orch logs -f` follows the running job: one line, exit 1.
    follower = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "logs", first, "--follow"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stopped_head = False
    try:
        assert follower.stdout is not None
        for line in follower.stdout:
            if line.startswith("step "):
                break
        stopped_head = cluster.script("stop").returncode == 0
        _, err = follower.communicate(timeout=120)
    finally:
        follower.kill()
        if stopped_head:  # back up for what follows, and the tests after this one
            restarted = cluster.script("start")
            assert restarted.returncode == 0, restarted.stderr
    assert follower.returncode == 1, err
    assert "lost the connection to the cluster" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err

    # Submitted again once the cluster is back, the run resumes from its checkpoints; and
    # `orch stop` stops a running job, whose checkpoints stay.
    saved = sorted((shared / "runs" / "long").glob("step-*/orch_checkpoint.json"))
    assert saved, "the job left no checkpoint"
    after = int(saved[-1].parent.name.split("-")[1]) + 1
    endless = [*TINY, *slot, *_storage(shared, data_cache), "train.max_steps=100000"]
    again = orch("submit", BERT, *_sets(*endless), "--name", "long", "--no-tracking", env=env)
    assert again.returncode == 0, again.stderr
    third = _job_id(again.stdout)
    _wait_for(lambda: f"step {after}/" in orch("logs", third, env=env).stdout, 300, "a resume")
    assert not re.search(r"^step 1/", orch("logs", third, env=env).stdout, re.M)
    stopped = orch("stop", third, env=env)
    assert stopped.returncode == 0 and f"{third}: STOPPED" in stopped.stdout
    assert orch("status", third, env=env).stdout.startswith(f"{third}: STOPPED")
    assert list((shared / "runs" / "long").glob("step-*/orch_checkpoint.json"))


# --------------------------------------------------------------------------- refusals
def _refused(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.mark.integration
def test_wrong_or_missing_token_is_refused_with_the_fix(
    cluster: LocalCluster, shared: Path, data_cache: Path, tmp_path: Path
) -> None:
    args = ["submit", BERT, *_sets(*TINY, *_storage(shared, data_cache)), "--no-tracking"]
    wrong = orch(*args, env=_client_env(ORCH_ADDRESS=cluster.url, RAY_AUTH_TOKEN="0" * 64))
    _refused(wrong, "rejected the token from $RAY_AUTH_TOKEN", "ray get-auth-token")
    # No token anywhere (an empty home has no ~/.ray/auth_token).
    missing = orch(*args, env=_client_env(ORCH_ADDRESS=cluster.url, HOME=str(tmp_path)))
    _refused(missing, "requires Ray's auth token and none was found", "RAY_AUTH_TOKEN")
    no_token = _client_env(ORCH_ADDRESS=cluster.url, HOME=str(tmp_path))
    status = orch("status", "orch-nope", env=no_token)
    _refused(status, "requires Ray's auth token")


@pytest.mark.integration
def test_unschedulable_request_is_refused(
    cluster: LocalCluster, shared: Path, data_cache: Path
) -> None:
    env = _with_token(cluster)
    gpus = orch(
        "submit",
        BERT,
        *_sets(
            *TINY, *_storage(shared, data_cache), "scaling.use_gpu=true", "scaling.num_workers=4"
        ),
        env=env,
    )
    _refused(gpus, "needs 4 GPU across 4 worker(s)", "the cluster has 0 GPU on 2 node(s)")
    spread = orch(
        "submit",
        BERT,
        *_sets(*TINY, *_storage(shared, data_cache), "scaling.num_workers=3",
               "scaling.placement_strategy=STRICT_SPREAD"),
        env=env,
    )  # fmt: skip
    _refused(spread, "STRICT_SPREAD needs 3 nodes", "the cluster has 2")
    unknown = orch("status", "orch-no-such-job", env=env)
    _refused(unknown, "no job 'orch-no-such-job'", "orch list")


@pytest.mark.integration
def test_upload_over_rays_limit_is_refused_before_uploading(
    cluster: LocalCluster, shared: Path, data_cache: Path
) -> None:
    # Ray reads its upload limit from this variable; a tiny one makes the checkout "too large".
    env = _with_token(cluster, RAY_max_grpc_message_size="100000")
    result = orch("submit", BERT, *_sets(*TINY, *_storage(shared, data_cache)), env=env)
    _refused(result, "over Ray's limit of 0.1 MiB", "the largest entries:", "excludes")


@pytest.mark.integration
def test_cluster_without_auth_is_refused_unless_allowed(shared: Path, data_cache: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="oi", dir="/tmp"))
    port = _free_port()
    env = _client_env(RAY_AUTH_MODE="disabled", ORCH_CLUSTER_DIR=str(directory))
    try:
        subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus=1",
             f"--temp-dir={directory / 'ray'}",
             "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
             f"--ray-client-server-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        client = _client_env(ORCH_ADDRESS=f"http://127.0.0.1:{port}")
        args = ["submit", BERT, *_sets(*TINY, *_storage(shared, data_cache))]
        _refused(orch(*args, env=client), "accepts job submissions without authentication")
        # --allow-insecure gets past that refusal; the fit check then stops this request
        # (2 workers of 1 CPU on a 1-CPU head), so nothing runs on the open cluster.
        allowed = orch(*args, "--allow-insecure", *_sets("scaling.resources_per_worker={CPU: 1}"),
                       env=client)  # fmt: skip
        _refused(allowed, "needs 2 CPU across 2 worker(s)")
        assert "without authentication" not in allowed.stderr
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)


def test_unreachable_address_and_relative_storage_are_refused(tmp_path: Path) -> None:
    env = _client_env(RAY_AUTH_TOKEN="t")
    shared = [f"train.storage_path={tmp_path}", f"data.cache_dir={tmp_path}"]
    down = orch("submit", BERT, "--address", f"127.0.0.1:{_free_port()}", *_sets(*shared), env=env)
    _refused(down, "cannot reach the Ray dashboard at http://127.0.0.1:", "--address")
    relative = orch("submit", BERT, "--address", "http://127.0.0.1:1", env=env)
    _refused(relative, "train.storage_path is './orch_runs', a relative path", "s3://")
    nowhere = orch("submit", BERT, *_sets(*shared), env=env)
    _refused(nowhere, "no cluster address", "--address", "ORCH_ADDRESS")
    ray_client = orch("list", "--address", "ray://head:10001", env=env)
    _refused(ray_client, "a Ray Client address", "http://HOST:8265")


# --------------------------------------------------------------------------- units
def test_address_comes_from_flag_then_env_then_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None, "head:8265") == ("http://head:8265", "cluster.address")
    monkeypatch.setenv("RAY_ADDRESS", "http://ray:8265")
    assert resolve_address(None, "head:8265") == ("http://ray:8265", "$RAY_ADDRESS")
    monkeypatch.setenv("ORCH_ADDRESS", "https://orch:443/")
    assert resolve_address(None, "head:8265") == ("https://orch:443", "$ORCH_ADDRESS")
    assert resolve_address("10.0.0.1:8265", None) == ("http://10.0.0.1:8265", "--address")
    with pytest.raises(JobsError, match="Ray Client address"):
        resolve_address("ray://x:10001", None)


def test_token_comes_from_env_then_path_then_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_token() == (None, "no token")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home\n")
    assert find_token() == ("home", "~/.ray/auth_token")
    (tmp_path / "tok").write_text("file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert find_token()[0] == "file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env")
    assert find_token() == ("env", "$RAY_AUTH_TOKEN")


@pytest.mark.parametrize(
    ("scaling", "per_worker", "nodes", "error"),
    [
        ({"num_workers": 2}, {"CPU": 1}, [{"CPU": 4}], None),
        ({"num_workers": 16}, {"CPU": 8, "GPU": 1}, [{"CPU": 256}], "needs 16 GPU across 16"),
        ({"num_workers": 2}, {"CPU": 3}, [{"CPU": 4}, {"CPU": 4}], None),
        ({"num_workers": 3}, {"CPU": 3}, [{"CPU": 5}, {"CPU": 5}], "do not fit on the nodes"),
        (
            {"num_workers": 2, "placement_strategy": "STRICT_PACK"},
            {"CPU": 2},
            [{"CPU": 3}, {"CPU": 3}],
            "on one node",
        ),
        (
            {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
            {"CPU": 1},
            [{"CPU": 8}],
            "needs 2 nodes",
        ),
        ({"num_workers": 2}, {"CPU": 1}, [{"CPU": 1}, {"CPU": 1}], "leaving Ray Data less"),
    ],
)
def test_fit_check(scaling: dict, per_worker: dict, nodes: list[dict], error: str | None) -> None:
    spec = ScalingSpec(**scaling)
    if error is None:
        check_fit(spec, per_worker, nodes)
    else:
        with pytest.raises(Unschedulable, match=error):
            check_fit(spec, per_worker, nodes)


def test_cluster_configs_use_token_auth_and_this_ray() -> None:
    import ray
    import yaml

    from orchestrator.load import load_workload
    from orchestrator.plan import worker_resources

    launcher = yaml.safe_load((ROOT / "cluster" / "gpu-aws.yaml").read_text())
    starts = [
        c
        for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
        if "ray start" in c
    ]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    assert "--dashboard-host=127.0.0.1" in starts[0]  # the dashboard is not on the network

    assert (
        f"FROM rayproject/ray:{ray.__version__}-py311" in (ROOT / "cluster/Dockerfile").read_text()
    )
    bert = load_workload(ROOT / "workloads" / "bert_pretrain.yaml")
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        doc = yaml.safe_load((ROOT / "cluster" / name).read_text())
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"]["mode"] == "token"
        assert spec["rayVersion"] == ray.__version__
        # At full size, the GPU group holds the shipped BERT workload.
        group = spec["workerGroupSpecs"][0]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        node = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
        check_fit(bert.scaling, worker_resources(bert.scaling), [node] * group["maxReplicas"])
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    workload = job["spec"]["entrypoint"].split()[2].removeprefix("/home/ray/orch/")
    assert load_workload(ROOT / workload).name == bert.name


def test_runtime_env_carries_the_workload_and_leaves_out_local_state(tmp_path: Path) -> None:
    from orchestrator.jobs.upload import STOP_WAIT, WORKLOAD_ENV, build_runtime_env
    from orchestrator.load import load_workload

    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / ".orch" / "data").mkdir(parents=True)
    (tmp_path / ".orch" / "data" / "big.parquet").write_bytes(b"x" * 100_000)
    (tmp_path / "orch_runs" / "step-1").mkdir(parents=True)
    (tmp_path / "orch_runs" / "step-1" / "model.pt").write_bytes(b"x" * 100_000)
    (tmp_path / "notes.tmp").write_text("scratch")
    (tmp_path / ".gitignore").write_text("*.tmp\n")
    spec = load_workload(
        ROOT / BERT,
        [
            "cluster.runtime_env.env_vars={WANDB_MODE: disabled}",
            "cluster.runtime_env.pip=[einops]",
            "cluster.runtime_env.excludes=[secrets/]",
        ],
    )
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative cache and storage paths are relative to where orch runs
    try:
        upload = build_runtime_env(spec, "name: x\n", tmp_path)
    finally:
        os.chdir(cwd)
    env = upload.runtime_env
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"] == {**STOP_WAIT, "WANDB_MODE": "disabled", WORKLOAD_ENV: "name: x\n"}
    assert env["pip"] == ["einops"]
    assert {".git/", "/.orch/data/", "orch_runs/", "secrets/"} <= set(env["excludes"])
    # Only train.py and .gitignore travel: the cache, checkpoints and ignored files stay.
    assert upload.files == 2 and upload.size_bytes < 1000
