"""shared.tracking against a real `mlflow server` (sqlite + artifacts proxied to SeaweedFS S3)."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from shared.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound, Unavailable  # noqa: E402
from shared.tracking import Tracker, find_run_by_tag, flatten_params, git_commit, register_model  # noqa: E402
from tests.harness import free_port  # noqa: E402
from tests.harness.process import HOST  # noqa: E402


class OutageProxy:
    """A TCP forwarder in front of the real MLflow server whose ``down()`` refuses and cuts connections
    the way a restarting server does, without the minute a real MLflow restart takes on a busy box."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def up(self) -> OutageProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                # shutdown() wakes the thread blocked in accept(); close() alone leaves it accepting.
                with contextlib.suppress(OSError):
                    self._listener.shutdown(socket.SHUT_RDWR)
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection((HOST, self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


@pytest.fixture(autouse=True)
def trainyard_home(tmp_path, monkeypatch):
    """Spool files and any embedded store go under the test's own directory."""
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_flatten_params_nests_with_dots_and_truncates():
    flat = flatten_params({"optim": {"name": "sgd", "lr": 0.01, "sched": {"step": 10}}, "bs": 64,
                           "classes": ["a", "b"], "long": "x" * 7000, "empty": {}})
    assert flat["optim.name"] == "sgd"
    assert flat["optim.lr"] == "0.01"
    assert flat["optim.sched.step"] == "10"
    assert flat["bs"] == "64"
    assert flat["classes"] == "['a', 'b']"
    assert flat["empty"] == "{}"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")
    with pytest.raises(InvalidArgument):
        flatten_params({"k" * 300: 1})


def test_git_commit_falls_back_to_env_then_unknown(tmp_path, monkeypatch):
    outside_repo = tmp_path / "no-repo"
    outside_repo.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find /work/main above
    monkeypatch.setenv("TRAINYARD_GIT_COMMIT", "abc123")
    assert git_commit(outside_repo) == "abc123"
    monkeypatch.delenv("TRAINYARD_GIT_COMMIT")
    assert git_commit(outside_repo) == "unknown"


def test_params_metrics_artifacts_read_back(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    job = uuid.uuid4().hex
    weights = bytes(range(256)) * 40
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(weights)
    (tmp_path / "model" / "card.json").write_text('{"name": "m"}')
    (tmp_path / "log.txt").write_text("epoch 1 done\n")
    many = {f"p{i:03d}": i for i in range(230)}  # more than one log_batch (100 params max)
    commit_before = git_commit()

    with Tracker("tracking-readback", run_name="readback", tracking_uri=mlflow_server.uri,
                 tags={"job_id": job}, config_hash="cfg123", dataset_version="mnist-v1") as t:
        t.log_params({"optim": {"lr": 0.01, "momentum": 0.9}, "batch_size": 64, **many})
        for step in range(5):
            t.log_metrics({"train/loss": 1.0 / (step + 1), "val_acc": 0.5 + step / 10}, step=step)
        t.log_artifact(tmp_path / "model", artifact_path="model")
        t.log_artifact(tmp_path / "log.txt")
        t.log_text("hello tracking", "notes/readme.txt")
        t.log_dict({"classes": ["simple", "text"]}, "meta/classes.json")
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        t.log_figure(fig, "plots/curve.png")
        plt.close(fig)
        t.set_tags({"stage": "unit"})
        with pytest.raises(InvalidArgument):
            t.log_metrics({"bad!name": 1.0}, step=0)
        with pytest.raises(InvalidArgument):
            t.log_metrics({"loss": "not a number"}, step=0)
        run_id = t.run_id
    assert t.run_id == run_id  # still readable after close
    with pytest.raises(FailedPrecondition):
        t.log_metrics({"late": 1.0}, step=9)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "readback"
    assert run.data.params["optim.lr"] == "0.01"
    assert run.data.params["optim.momentum"] == "0.9"
    assert run.data.params["batch_size"] == "64"
    assert run.data.params["p229"] == "229"
    assert run.data.tags["config_hash"] == "cfg123"
    assert run.data.tags["dataset_version"] == "mnist-v1"
    assert run.data.tags["job_id"] == job
    assert run.data.tags["stage"] == "unit"
    # HEAD can move while the suite runs in a live checkout; before or after is right.
    assert run.data.tags["git_commit"] in {commit_before, git_commit()}
    assert history(client, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert history(client, run_id, "val_acc") == [(s, 0.5 + s / 10) for s in range(5)]

    out = tmp_path / "download"
    out.mkdir()
    root = Path(client.download_artifacts(run_id, "", str(out)))
    assert (root / "model" / "weights.bin").read_bytes() == weights
    assert (root / "model" / "card.json").read_text() == '{"name": "m"}'
    assert (root / "log.txt").read_text() == "epoch 1 done\n"
    assert (root / "notes" / "readme.txt").read_text() == "hello tracking"
    assert json.loads((root / "meta" / "classes.json").read_text()) == {"classes": ["simple", "text"]}
    assert (root / "plots" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert find_run_by_tag("tracking-readback", "job_id", job, tracking_uri=mlflow_server.uri) == run_id
    assert find_run_by_tag("tracking-readback", "job_id", "nope", tracking_uri=mlflow_server.uri) is None
    assert find_run_by_tag("no-such-experiment", "job_id", job, tracking_uri=mlflow_server.uri) is None


def test_failed_and_killed_status(mlflow_server):
    client = MlflowClient(mlflow_server.uri)
    with pytest.raises(RuntimeError, match="diverged"), Tracker("tracking-status", tracking_uri=mlflow_server.uri) as t:
        t.log_metrics({"loss": float("nan")}, step=0)
        raise RuntimeError("loss diverged")
    failed = client.get_run(t.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == "RuntimeError: loss diverged"

    with pytest.raises(KeyboardInterrupt), Tracker("tracking-status", tracking_uri=mlflow_server.uri) as t2:
        raise KeyboardInterrupt
    assert client.get_run(t2.run_id).info.status == "KILLED"
    with pytest.raises(Cancelled), Tracker("tracking-status", tracking_uri=mlflow_server.uri) as t3:
        raise Cancelled("stopped by the user")
    assert client.get_run(t3.run_id).info.status == "KILLED"

    with pytest.raises(NotFound):
        Tracker("tracking-status", tracking_uri=mlflow_server.uri, run_id=uuid.uuid4().hex).start()


def test_register_model_versions(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server.uri)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x00" * 64)
    with Tracker("tracking-registry", tracking_uri=mlflow_server.uri) as t:
        t.log_artifact(tmp_path / "model", artifact_path="model")
    name = f"mnist-{uuid.uuid4().hex[:8]}"
    v1 = register_model(mlflow_server.uri, name, t.run_id, "model", {"accuracy": 0.99})
    v2 = register_model(mlflow_server.uri, name, t.run_id, "model", None)
    assert (v1, v2) == (1, 2)
    mv = client.get_model_version(name, "1")
    assert mv.run_id == t.run_id
    assert mv.source.endswith("/model")
    assert mv.tags == {"accuracy": "0.99"}


def test_embedded_sqlite_store_under_trainyard_home(trainyard_home, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with Tracker("embedded") as t:
        t.log_metrics({"acc": 0.9}, step=1)
        t.log_text("x", "a.txt")
    assert t.tracking_uri == f"sqlite:///{trainyard_home / 'mlflow.db'}"
    client = MlflowClient(t.tracking_uri)
    assert history(client, t.run_id, "acc") == [(1, 0.9)]
    # Artifacts land under $TRAINYARD_HOME, not in a ./mlruns of whatever directory the job ran in.
    assert list(trainyard_home.glob("mlartifacts/embedded/*/artifacts/a.txt"))


def test_unreachable_server_raises_unavailable_within_deadline():
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(Unavailable, match="unreachable"):
        Tracker("x", tracking_uri=dead, call_timeout=2).start()
    assert time.monotonic() - start < 15


def test_buffers_through_outage_and_replays_spool(mlflow_server):
    """Steps logged while the server is unreachable reach it once it is back; a tracker that gave up at
    close leaves a spool file that a resumed tracker replays."""
    client = MlflowClient(mlflow_server.uri)
    proxy = OutageProxy(mlflow_server.port).up()
    t1 = Tracker("tracking-outage", tracking_uri=proxy.uri, close_timeout=60)
    t2 = Tracker("tracking-outage", tracking_uri=proxy.uri, close_timeout=1)
    try:
        for step in range(5):
            t1.log_metrics({"loss": 10.0 - step}, step=step)
        t2.log_metrics({"acc": 0.0}, step=0)

        proxy.down()
        begin = time.monotonic()
        for step in range(5, 10):
            t1.log_metrics({"loss": 10.0 - step}, step=step)
        for step in range(1, 4):
            t2.log_metrics({"acc": step / 10}, step=step)
        # Buffering must not stall a training loop while the server is away.
        assert time.monotonic() - begin < 5
        assert t1.pending == 5 and t2.pending == 3
        spooled = [json.loads(line) for line in t1.spool_path.read_text().splitlines()]
        assert [(r["step"], r["value"]) for r in spooled] == [(s, 10.0 - s) for s in range(5, 10)]
        assert t1.flush() is False

        with pytest.raises(Unavailable, match="spool"):
            t2.close()
        assert t2.spool_path.exists()

        # close() waits for the server, which comes back while it waits.
        reviver = threading.Timer(2.0, proxy.up)
        reviver.start()
        t1.close()
        reviver.join()
        assert t1.pending == 0 and not t1.spool_path.exists()
        assert history(client, t1.run_id, "loss") == [(s, 10.0 - s) for s in range(10)]
        assert client.get_run(t1.run_id).info.status == "FINISHED"

        # The job that gave up restarts and resumes its run: the spooled steps are replayed.
        with Tracker("tracking-outage", tracking_uri=proxy.uri, run_id=t2.run_id) as t3:
            assert t3.pending == 0
            t3.log_metrics({"acc": 0.4}, step=4)
        assert not t2.spool_path.exists()
        assert history(client, t2.run_id, "acc") == [(s, s / 10) for s in range(5)]
        assert client.get_run(t2.run_id).info.status == "FINISHED"
    finally:
        proxy.down()


@pytest.mark.slow
def test_survives_real_server_restart(mlflow_server):
    """The same through a real stop and start of `mlflow server` (a minute or more on a busy box)."""
    client = MlflowClient(mlflow_server.uri)
    t = Tracker("tracking-restart", tracking_uri=mlflow_server.uri, close_timeout=300)
    starter: threading.Thread | None = None
    try:
        for step in range(5):
            t.log_metrics({"loss": 10.0 - step}, step=step)
        mlflow_server.stop()
        begin = time.monotonic()
        for step in range(5, 10):
            t.log_metrics({"loss": 10.0 - step}, step=step)
        assert time.monotonic() - begin < 5
        assert t.pending == 5
        # close() waits while the server starts again.
        starter = threading.Thread(target=mlflow_server.start)
        starter.start()
        t.close()
    finally:
        if starter is not None:
            starter.join()
        if not mlflow_server.running():
            mlflow_server.start()
    assert history(client, t.run_id, "loss") == [(s, 10.0 - s) for s in range(10)]
    assert client.get_run(t.run_id).info.status == "FINISHED"
    assert not t.spool_path.exists()
