"""The `trainyard` command's habits, as a user meets them in real subprocesses: `--version`, `--json` (and
`-o json`) on every command that lists or shows, against real services; readable logs on a terminal (a real
pseudo-terminal) and JSON lines elsewhere, services' JSON unchanged; shell completion through argcomplete's
protocol and through the printed bash script in a real bash."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli.local_stack import SERVICES, down, up
from services.train.server import build_manager
from services.train.studies.manager import StudyManager
from shared.pb import train_pb2
from shared.storage import open_store
from tests.harness import free_ports
from tests.harness.inference import digits_nhwc, publish_random, reference_probs, serving
from tests.harness.services import served, train_registrar

ROOT = Path(__file__).resolve().parent.parent
JSON_LINE = re.compile(r"^\{.*\}$")
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (INFO|WARNING|ERROR|DEBUG) +[\w.]+: ")


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    home = tmp_path / "home"
    monkeypatch.setenv("TRAINYARD_HOME", str(home))  # for the services the tests start in this process
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINYARD_", "AWS_", "_ARGCOMPLETE"))}
    return {**env, "TRAINYARD_HOME": str(home), "PYTHONPATH": str(ROOT)}


def cli(env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_json(env, *args: str, ok: bool = True):
    run = cli(env, *args)
    assert (run.returncode == 0) == ok, run.stdout + run.stderr
    return json.loads(run.stdout)


def read_terminal(master: int, deadline: float, until: bytes | None = None) -> bytes:
    """What a pseudo-terminal showed until every process holding its other end closed it (or ``until`` showed)."""
    shown = b""
    while until is None or until not in shown:
        assert select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0], f"timed out: {shown!r}"
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed everywhere
            break
        if not data:
            break
        shown += data
    return shown


def on_a_terminal(cmd: list[str], env, timeout: float = 120) -> tuple[int, str, str]:
    """Run ``cmd`` with stderr on a fresh pseudo-terminal (stdout a pipe): (exit code, stdout, what the terminal
    showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    try:
        shown = read_terminal(master, time.monotonic() + timeout)
    finally:
        os.close(master)
    out = proc.communicate(timeout=timeout)[0].decode()
    return proc.returncode, out, shown.decode().replace("\r\n", "\n")


# -- --version -------------------------------------------------------------------------------------------------

def test_version_names_the_package_the_commit_python_and_torch(env):
    run = cli(env, "--version")
    assert run.returncode == 0, run.stderr
    line = run.stdout.strip()
    assert line.startswith(f"trainyard {metadata.version('trainyard')}, commit ")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert head[:12] in line
    assert f"python {sys.version.split()[0]}" in line and line.endswith(f"torch {metadata.version('torch')}")


def test_version_and_completion_stay_fast_without_torch(env):
    # Every tab press runs the CLI: building its parser must not import torch (seconds).
    code = ("import sys; from cli.main import build_parser; build_parser(); "
            "from cli.version import version_text; version_text(); print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "False", run.stderr


def test_version_outside_a_checkout_has_no_commit(tmp_path):
    from cli.version import git_commit

    assert git_commit(tmp_path) is None


# -- --json on what lists or shows ------------------------------------------------------------------------------

def test_models_list_and_summary_as_json(env):
    rows = cli_json(env, "models", "list", "--json", "--pattern", "mnist_*")
    assert {r["name"] for r in rows} >= {"mnist_ultralight", "mnist_cake", "mnist_rough"}
    assert all(set(r) == {"name", "source", "params", "description"} and r["source"] == "trainyard" for r in rows)
    ultralight = next(r for r in rows if r["name"] == "mnist_ultralight")
    assert ultralight["params"] == 6008

    summary = cli_json(env, "models", "summary", "mnist_ultralight", "--input", "1x28x28", "--json")
    assert summary["total_params"] == summary["trainable_params"] == 6008
    assert summary["input_size"] == [1, 28, 28] and summary["output_shape"] == [10]
    assert sum(r["params"] for r in summary["rows"]) == 6008
    assert summary["rows"][0] == {"name": "features.0", "type": "Conv2d", "input_shape": [1, 28, 28],
                                  "output_shape": summary["rows"][0]["output_shape"], "kernel": "3x3",
                                  "params": summary["rows"][0]["params"]}


def test_validate_as_json(env, tmp_path):
    (tmp_path / "llava").mkdir()
    report = cli_json(env, "convert", "validate", str(tmp_path / "llava"), "--json", ok=False)
    assert report["path"] == str(tmp_path / "llava") and report["ok"] is False
    assert any("train.json" in p for p in report["problems"])
    # -o json is the same document; text stays the default
    assert cli_json(env, "convert", "validate", str(tmp_path / "llava"), "-o", "json", ok=False) == report
    text = cli(env, "convert", "validate", str(tmp_path / "llava")).stdout
    assert text.startswith(f"{tmp_path / 'llava'}: {len(report['problems'])} problem(s)")


def test_up_status_and_job_as_json_against_a_running_service(env, tmp_path):
    grpc_port, metrics_port = free_ports(2)
    state = up(["render"], ports={"render": (grpc_port, metrics_port)}, deadline_s=120)
    address = state["render"]["address"]
    try:
        # already running: `up` reports it without starting another
        rows = cli_json(env, "up", "render", "--json")
        assert rows == [{"service": "render", "address": address, "metrics": state["render"]["metrics"],
                         "rest": None, "pid": state["render"]["pid"], "log": state["render"]["log"]}]

        run = cli(env, "status", "--json")
        status = {r["service"]: r for r in json.loads(run.stdout)}
        assert list(status) == SERVICES
        assert status["render"] == {**rows[0], "health": "SERVING"}
        assert all(set(r) == {"service", "address", "metrics", "rest", "pid", "log", "health"}
                   for r in status.values())
        assert run.returncode == (0 if all(r["health"] == "SERVING" for r in status.values()) else 1)

        out = tmp_path / "digits"
        rendered = cli(env, "render", "digits", "--out", str(out), "--count", "20", "--test-count", "4",
                       "--workers", "1", "--server", address, "--no-progress")
        assert rendered.returncode == 0, rendered.stderr
        job = cli_json(env, "job", "render", "--output", str(out), "--server", address, "--json")
        assert job["service"] == "render" and job["state"] == "succeeded" and job["job_id"]
        assert job["done"] == job["total"] == 24 and job["failed"] == 0 and job["failures"] == []
        assert job["outputs"] == {"output": str(out)}
        text = cli(env, "job", "render", job["job_id"], "--server", address).stdout
        assert text.startswith(f"job {job['job_id']} (render ") and ": succeeded, 24/24 after" in text
    finally:
        down(grace_s=20)


CONFIG = """\
experiment: cli-json
model: {name: mnist_ultralight}
data: {kind: synthetic, train_size: 256, val_size: 64}
epochs: 2
batch_size: 64
"""

STUDY = """\
name: cli-json-study
base_config:
  experiment: the-study-names-it
  model: {name: mnist_ultralight}
  data: {kind: synthetic, train_size: 256, val_size: 64, test_size: 64}
  epochs: 1
  batch_size: 64
grid:
  seed: [0, 1]
parallelism: 1
"""


@pytest.fixture
def train_server(env, tmp_path, monkeypatch):
    """The train service in this process with no worker slot: runs and trials are real records that stay queued
    (nothing trains), which is all that listing and showing them needs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    manager = build_manager(max_concurrent=0)
    studies = StudyManager(manager, open_store(), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", poll_s=0.2)
    with served("train", train_registrar(manager, studies), grace=1) as address:
        yield address


def test_runs_and_studies_as_json_against_the_train_service(env, tmp_path, train_server):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    server = ("--server", train_server)
    fields = set(train_pb2.Run.DESCRIPTOR.fields_by_name)

    first = cli_json(env, "train", "--config", str(config), *server, "--json")
    assert set(first) == fields and first["state"] == "QUEUED" and first["epochs"] == 2
    assert first["run_id"].startswith("cli-json-") and first["model"] == "mnist_ultralight"
    second = cli_json(env, "train", str(config), "--set", "epochs=3", *server, "-o", "json")
    assert second["epochs"] == 3

    listed = cli_json(env, "runs", "list", *server, "--json")
    assert sorted(r["run_id"] for r in listed) == sorted([first["run_id"], second["run_id"]])
    assert all(set(r) == fields and r["state"] == "QUEUED" for r in listed)
    table = cli(env, "runs", "list", *server).stdout
    assert table.startswith("run id") and first["run_id"] in table and "QUEUED" in table

    shown = cli_json(env, "runs", "show", first["run_id"], *server, "--json")
    assert shown["run_id"] == first["run_id"] and shown["config_yaml"] and shown["metrics"] == {}
    cancelled = cli_json(env, "runs", "cancel", second["run_id"], *server, "--json")
    assert cancelled["run_id"] == second["run_id"] and cancelled["state"] == "CANCELLED"

    spec = tmp_path / "study.yaml"
    spec.write_text(STUDY)
    study = cli_json(env, "study", "run", str(spec), *server, "--json")
    assert study["name"] == "cli-json-study" and study["state"] == "RUNNING" and study["mlflow_parent_run_id"]
    # a trial's overrides are values, not the JSON text they travel in
    assert sorted(t["overrides"]["seed"] for t in study["trials"]) == [0, 1]
    assert cli_json(env, "study", "list", *server, "--json") == [
        cli_json(env, "study", "status", study["study_id"], *server, "--json")]
    ended = cli_json(env, "study", "cancel", study["study_id"], *server, "--json")
    assert ended["study_id"] == study["study_id"] and ended["state"] == "CANCELLED"
    status = cli_json(env, "study", "status", study["study_id"], *server, "--json")
    assert {t["trial_id"] for t in status["trials"]} == {t["trial_id"] for t in study["trials"]}
    text = cli(env, "study", "status", study["study_id"], *server).stdout
    assert text.startswith(f"study {study['study_id']}  CANCELLED") and "seed=0" in text


def test_bench_as_json(env, tmp_path):
    run = cli(env, "bench", "--models", "mnist_ultralight", "--input", "1x28x28", "--batch-sizes", "1",
              "--threads", "1", "--no-quantize", "--no-tracking", "--no-progress", "--out", str(tmp_path / "b.md"),
              "--json")
    assert run.returncode == 0, run.stderr
    [result] = json.loads(run.stdout)  # stdout is the document alone
    assert result["model"] == "mnist_ultralight" and result["params_total"] == 6008 and result["error"] is None
    assert result["latency_p50_ms"] > 0 and set(result["throughput"]) == {"1"}
    assert f"wrote {tmp_path / 'b.md'}" in run.stderr and (tmp_path / "b.md").exists()


def test_predict_as_json(env, tmp_path):
    store = open_store(tmp_path / "store")
    publish_random(store, "cli-digits", seed=5)
    images, _ = digits_nhwc(3, seed=6)
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"d{i}.png"))
        Image.fromarray(img[:, :, 0]).save(paths[-1])
    expected = reference_probs(store, "cli-digits", 1, torch.from_numpy(images).permute(0, 3, 1, 2))
    with serving(store, "cli-digits") as address:
        args = ("predict", "--server", address, "--model", "cli-digits", "--top-k", "2", *paths)
        records = cli_json(env, *args, "--json")
        text = cli(env, *args).stdout
    assert [r["source"] for r in records] == paths
    for i, r in enumerate(records):
        assert (r["kind"], r["model"], r["version"]) == ("classification", "cli-digits", "1")
        order = np.argsort(-expected[i], kind="stable")[:2]
        assert [t["label"] for t in r["top"]] == [str(j) for j in order]
        np.testing.assert_allclose([t["confidence"] for t in r["top"]], expected[i][order], atol=1e-5)
    lines = text.splitlines()
    assert lines[0] == "model cli-digits version 1: 3 image(s)"
    assert lines[1].split()[1::2] == [t["label"] for t in records[0]["top"]]


def test_json_output_turns_non_finite_numbers_into_null(capsys):
    # a diverged run's loss is NaN; Python would print NaN, which is not JSON (jq refuses it)
    from argparse import Namespace

    from cli.output import emit

    emit(Namespace(output_format="json"), {"metrics": {"train_loss": float("nan"), "val_acc": 0.5},
                                           "curve": [float("inf"), 1.0]}, "unused")
    assert json.loads(capsys.readouterr().out) == {"metrics": {"train_loss": None, "val_acc": 0.5},
                                                   "curve": [None, 1.0]}


# -- logs --------------------------------------------------------------------------------------------------------

RENDER = ["--log-level", "INFO", "render", "digits", "--count", "20", "--test-count", "4", "--workers", "1",
          "--no-progress", "--out"]


def test_logs_are_readable_on_a_terminal(env, tmp_path):
    code, out, shown = on_a_terminal([sys.executable, "-m", "cli", *RENDER, str(tmp_path / "d")], env)
    assert code == 0, shown
    assert out.startswith(f"published {tmp_path / 'd'}")  # stdout is untouched
    logged = [line for line in shown.splitlines() if TEXT_LINE.match(line)]
    assert len(logged) >= 2, shown  # the render's and the publication's
    rendered = next(line for line in logged if "services.render.digits: digits rendered" in line)
    assert rendered.split()[1] == "INFO" and "  prefix=d train=20 test=4 seconds=" in rendered
    assert not any(JSON_LINE.match(line) for line in shown.splitlines()), shown


def test_logs_are_json_lines_when_stderr_is_not_a_terminal(env, tmp_path):
    run = cli(env, *RENDER, str(tmp_path / "d"))
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    rendered = next(r for r in records if r["msg"] == "digits rendered")
    assert rendered["level"] == "info" and rendered["logger"] == "services.render.digits"
    assert (rendered["prefix"], rendered["train"], rendered["test"]) == ("d", 20, 4)


def test_log_format_json_on_a_terminal_when_asked(env, tmp_path):
    code, _, shown = on_a_terminal([sys.executable, "-m", "cli", "--log-format", "json", *RENDER,
                                    str(tmp_path / "d")], env)
    assert code == 0, shown
    assert any(json.loads(line)["msg"] == "digits rendered" for line in shown.splitlines() if line)


def test_text_log_lines_keep_each_field_one_token_and_show_tracebacks():
    import io
    import logging

    from shared import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    log = logging.getLogger("t")  # its own handler: the test process's logging stays as pytest set it
    log.addHandler(handler)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"where": "a b", "n": 3, "shape": [1, 2], "empty": ""})
    finally:
        log.removeHandler(handler)
    first, *rest = stream.getvalue().splitlines()
    assert TEXT_LINE.match(first) and first.endswith('t: failed  where="a b" n=3 shape=[1,2] empty=""'), first
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def test_services_log_json_even_on_a_terminal(env):
    grpc_port, metrics_port = free_ports(2)
    cmd = [sys.executable, "-m", "services.render", "--port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--host", "127.0.0.1"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    try:
        shown = read_terminal(master, time.monotonic() + 120, until=b"\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        os.close(master)
    first = shown.decode().splitlines()[0]
    assert json.loads(first)["logger"].startswith(("shared", "services")), first


# -- shell completion -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shell, marker", [("bash", "complete "), ("zsh", "compdef"), ("fish", "complete --command")])
def test_completion_prints_each_shells_script(env, shell, marker):
    run = cli(env, "completion", shell)
    assert run.returncode == 0, run.stderr
    assert marker in run.stdout and "trainyard" in run.stdout and len(run.stdout.splitlines()) > 3


def complete(env, line: str, tmp_path) -> list[str]:
    """argcomplete's protocol, as the shell script speaks it: the line in COMP_LINE, the answers in a file."""
    answers = tmp_path / "answers"
    run = subprocess.run([sys.executable, "-m", "cli"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**env, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
                              "COMP_POINT": str(len(line)), "_ARGCOMPLETE_STDOUT_FILENAME": str(answers)})
    assert run.returncode == 0, run.stderr
    return answers.read_text().split("\n")


def test_completion_of_subcommands_choices_and_options(env, tmp_path):
    assert complete(env, "trainyard ru", tmp_path) == ["runs "]
    assert set(complete(env, "trainyard st", tmp_path)) == {"status", "study"}  # no space: not yet unique
    assert complete(env, "trainyard job r", tmp_path) == ["render "]
    assert complete(env, "trainyard runs list --js", tmp_path) == ["--json "]
    assert {"bash", "zsh", "fish"} <= set(complete(env, "trainyard completion ", tmp_path))


def test_bash_completes_through_the_printed_script(env):
    # The script as a user evals it, in a real bash, calling the installed `trainyard` console script.
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "trainyard").exists(), "the trainyard console script is installed by `pip install -e .`"
    script = """
        eval "$(trainyard completion bash)"
        COMP_LINE="trainyard stu"; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(trainyard stu); COMP_CWORD=1
        _python_argcomplete trainyard
        printf '%s\\n' "${COMPREPLY[@]}"
    """
    run = subprocess.run([shutil.which("bash"), "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[0].strip() == "study"
