"""`make demo`: the whole pipeline on embedded defaults, end to end, through the services.

1. services  — all five start locally and report their health;
2. datasets  — synthetic CAD models rendered to views and converted to TinyLLaVA (validated),
               trajectory videos, logos and MNIST-format digits, rendered through RenderService;
3. training  — the three MNIST setups train for a few epochs on a 2,000-digit subset through TrainService,
               as three runs of one MLflow experiment, compared in a table;
4. serving   — the model selected on validation is served by the inference service and classifies test
               digits through the gRPC client; the three MNIST models are benchmarked;
5. a study   — three timm backbones x two training-set sizes on rendered CIFAR-format data, two trials at
               a time through TrainService, each model benchmarked, the table and report from MLflow;
6. captioner — the CAD captioner trains for a few epochs on the converted TinyLLaVA data through
               TrainService, is served, and describes three held-out views over gRPC beside the truth.

Everything lands in ``.trainyard/demo`` (TRAINYARD_HOME for the demo), recreated on each run.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MNIST_SETUPS = ("mnist_rough", "mnist_cake", "mnist_ultralight")


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def stage_services() -> dict:
    from cli.local_stack import status, up

    banner("1. services")
    state = up(deadline_s=180)
    for name, info in status().items():
        print(f"  {name:<10} {info['address']:<18} {info['health']}")
    return state


def _render(stub, request, label: str):
    from tqdm import tqdm

    bar = tqdm(desc=f"  {label}", unit="item", leave=True)
    last = None
    for progress in stub.Render(request):
        bar.total = progress.total or bar.total
        bar.n = progress.done
        bar.refresh()
        last = progress
    bar.close()
    return last


def stage_datasets(state: dict, data: Path) -> dict[str, str]:
    from shared.grpc_client import channel
    from shared.pb import convert_pb2, convert_pb2_grpc, render_pb2, render_pb2_grpc
    from shared.storage import open_location

    banner("2. datasets")
    render = render_pb2_grpc.RenderServiceStub(channel(state["render"]["address"]))
    convert = convert_pb2_grpc.ConvertServiceStub(channel(state["convert"]["address"]))
    out = {name: str(data / name) for name in ("cad_json", "cad_views", "tinyllava", "trajectories", "logos",
                                                 "digits", "cifar")}
    workers = os.cpu_count() or 1
    jobs = [
        ("cad-synth", render_pb2.RenderRequest(out=out["cad_json"], count=500, seed=1, workers=workers,
                                               cad_synth=render_pb2.CadSynth())),
        ("cad views", render_pb2.RenderRequest(out=out["cad_views"], workers=workers,
                                               cad=render_pb2.CadRender(input=out["cad_json"], image_size=128))),
        ("trajectories", render_pb2.RenderRequest(out=out["trajectories"], count=400, seed=2, workers=workers,
                                                  trajectories=render_pb2.TrajectoryRender())),
        ("logos", render_pb2.RenderRequest(out=out["logos"], count=400, seed=3, workers=workers,
                                           logos=render_pb2.LogoRender(image_size=128))),
        ("digits", render_pb2.RenderRequest(out=out["digits"], count=6000, seed=4, workers=workers,
                                            digits=render_pb2.DigitRender(test_count=1000))),
        ("cifar-format", render_pb2.RenderRequest(out=out["cifar"], count=2500, seed=5, workers=workers,
                                                  cifar_synth=render_pb2.CifarSynthRender(test_count=500))),
    ]
    for label, request in jobs:
        last = _render(render, request, label)
        print(f"  {label}: {last.done} items in {last.elapsed_seconds:.1f}s, {last.failed} failed")

    for progress in convert.ToTinyLlava(convert_pb2.TinyLlavaRequest(
            cad_json=out["cad_json"], images=out["cad_views"], out=out["tinyllava"], seed=1)):
        last = progress
    print(f"  tinyllava: {last.done} records in {last.elapsed_seconds:.2f}s")
    report = convert.Validate(convert_pb2.ValidateRequest(path=out["tinyllava"]))
    print("  validate: " + report.text.replace("\n", "\n  "))
    if not report.ok:
        raise SystemExit("the converted dataset failed validation")

    print("\n  dataset                 files      MB  items")
    for name, location in out.items():
        store, prefix = open_location(location)
        manifest = store.read_manifest(prefix)
        meta = manifest.meta or {}
        items = meta.get("total") or meta.get("num_records") or ""
        print(f"  {name:<22} {len(manifest.files):>6} {manifest.total_size / 1e6:>7.1f}  {items}")
    return out


def stage_training(state: dict, digits: str, epochs: int = 3, subset: int = 1200) -> list:
    from tqdm import tqdm

    from shared.grpc_client import channel
    from shared.pb import train_pb2, train_pb2_grpc

    banner("3. training")
    stub = train_pb2_grpc.TrainServiceStub(channel(state["train"]["address"]))
    runs = []
    for name in MNIST_SETUPS:
        config = (REPO / "configs" / f"{name}.yaml").read_text()
        run = stub.SubmitRun(train_pb2.SubmitRunRequest(
            config_yaml=config, overrides=[f"data.path={digits}", f"epochs={epochs}", f"data.subset={subset}",
                                           f"data.train_eval_size={subset}", "experiment=demo-mnist"]))
        print(f"  submitted {run.run_id} ({name})")
        runs.append(run.run_id)
    finished = []
    for run_id in runs:
        bar = tqdm(desc=f"  {run_id}", total=epochs, unit="epoch")
        for event in stub.WatchRun(train_pb2.WatchRunRequest(run_id=run_id)):
            if event.HasField("epoch"):
                bar.n = event.epoch.epoch
                bar.set_postfix(val_acc=f"{event.epoch.metrics.get('val_acc', 0):.4f}")
        bar.close()
        run = stub.GetRun(train_pb2.GetRunRequest(run_id=run_id))
        if run.state != train_pb2.RUN_STATE_SUCCEEDED:
            raise SystemExit(f"run {run_id} ended {train_pb2.RunState.Name(run.state)}: {run.message}")
        finished.append(run)
    print_comparison(finished)
    return finished


def print_comparison(runs) -> None:
    """The comparison table: each run's selected model (its card: validation at the selected epoch, test
    evaluated once at the end) beside what MLflow recorded of the run."""
    from mlflow import MlflowClient

    from cli.runs import TEST_SELECTED, selection_label
    from shared.modelcard import parse_model_ref, read_card
    from shared.settings import load_settings
    from shared.storage import open_store

    settings = load_settings()
    client, store = MlflowClient(settings.mlflow_uri), open_store(settings.store_url)
    print(f"\n  {'model':<18} {'params':>10} {'train acc':>9} {'val acc':>8} {'test acc':>8} {'gap':>7} "
          f"{'val ECE':>7} {'samples/s':>10}  {'selected on':<11}  MLflow run")
    peeked = False
    for run in runs:
        ref = parse_model_ref(run.model_uri)
        card = read_card(store, ref.name, ref.version)
        mlflow_run = client.get_run(run.mlflow_run_id)
        m, logged = card.metrics, mlflow_run.data.metrics
        peeked |= card.selection_split == "test"
        print(f"  {run.model:<18} {int(logged['num_params']):>10,} {m['train_acc']:>9.4f} {m['val_acc']:>8.4f} "
              f"{m['test_acc']:>8.4f} {m['overfit_gap']:>7.4f} {m['val_ece']:>7.4f} "
              f"{logged['samples_per_second']:>10.0f}  {selection_label(card.selection_split):<11}  "
              f"{mlflow_run.info.run_name}")
    print(f"  val acc: the selected epoch, on {card.val_source}; test acc: the test split, evaluated once at the "
          "end; gap: train acc (eval mode, no augmentation) - val acc")
    if peeked:
        print(f"  (!) {TEST_SELECTED}")
    sample = client.get_run(runs[-1].mlflow_run_id)
    system = sorted(k for k in sample.data.metrics if k.startswith("system/"))
    dataset = sample.inputs.dataset_inputs[0].dataset
    print(f"  MLflow: source commit {sample.data.tags.get('mlflow.source.git.commit', '?')[:12]}, dataset "
          f"{dataset.name} (digest {dataset.digest}), {len(system)} system metrics ({', '.join(system[:3])}, ...)")


def stage_serving(state: dict, runs: list, digits: str) -> None:
    from shared.data import read_mnist
    from shared.grpc_client import channel
    from shared.inference_client import InferenceClient
    from shared.modelcard import parse_model_ref, read_card
    from shared.pb import benchmark_pb2, benchmark_pb2_grpc
    from shared.settings import load_settings
    from shared.storage import open_store

    banner("4. serving and benchmarking")
    store = open_store(load_settings().store_url)
    refs = {r.run_id: parse_model_ref(r.model_uri) for r in runs}
    cards = {run_id: read_card(store, ref.name, ref.version) for run_id, ref in refs.items()}
    best = max(runs, key=lambda r: cards[r.run_id].metrics["val_acc"])  # chosen on validation, never on test
    name, version = refs[best.run_id].name, refs[best.run_id].version
    client = InferenceClient(state["inference"]["address"])
    client.load_model(name, alias="champion")
    print(f"  serving {name}@champion = {best.model_uri} (selected on validation: val acc "
          f"{cards[best.run_id].metrics['val_acc']:.4f}) at {state['inference']['address']}")
    _, test = read_mnist(digits)
    picks = list(range(0, len(test.labels), len(test.labels) // 12))[:12]
    images = [test.images[i, 0].numpy() for i in picks]
    predictions = client.classify(name, images, version=version, top_k=3)
    right = 0
    print("  digit  predicted  confidence  runner-up")
    for i, pred in zip(picks, predictions, strict=True):
        truth = test.classes[int(test.labels[i])]
        right += pred.label == truth
        print(f"  {truth:>5}  {pred.label:>9}  {pred.confidence:>10.3f}  {pred.top[1][0]} ({pred.top[1][1]:.3f})")
    print(f"  {right}/{len(picks)} correct through the gRPC client")

    stub = benchmark_pb2_grpc.BenchmarkServiceStub(channel(state["benchmark"]["address"]))
    table = Path(os.environ["TRAINYARD_HOME"]) / "mnist_benchmark.md"
    request = benchmark_pb2.BenchmarkRequest(
        models=[f"store:{r.model_uri}" for r in runs], input_shape=[1, 28, 28], batch_sizes=[1, 64],
        quantize=True, dataset=digits, out=str(table))
    results = [e.result for e in stub.Benchmark(request) if e.HasField("result")]
    print(f"\n  {'model':<30} {'params (M)':>10} {'GMACs':>7} {'latency (ms)':>12} {'img/s @64':>10} "
          f"{'peak MB':>8} {'test acc fp32 %':>15} {'test acc int8 %':>15}")
    for r in results:
        bs64 = {t.batch_size: t.samples_per_second for t in r.throughput}.get(64, 0.0)
        print(f"  {r.model:<30} {r.params_total / 1e6:>10.3f} {r.gmacs:>7.4f} {r.latency_p50_ms:>12.2f} "
              f"{bs64:>10.0f} {r.peak_memory_mb:>8.1f} {r.accuracy_fp32:>15.2f} {r.accuracy_int8:>15.2f}"
              + (f"  error: {r.error}" if r.error else ""))
    print(f"  full table (all columns, CSV and plot beside it): {table}")


STUDY_SPEC = """
name: demo-cifar
base_config:
  experiment: demo-cifar
  model: {{name: resnet10t}}
  data: {{kind: cifar10, path: {path}, augment: {{crop: 4, flip: true}}}}
  epochs: 2
  batch_size: 64
  optimizer: {{name: adamw, lr: 0.003, weight_decay: 0.05}}
  scheduler: {{name: cosine}}
grid:
  model.name: [mobilenetv3_small_100, resnet10t, convnextv2_atto]
  data.subset: [300, 1200]
parallelism: 2
benchmark: {{input_shape: [3, 32, 32], batch_sizes: [1, 64], iterations: 10, throughput_seconds: 0.3}}
report:
  title: "Demo study: three timm backbones x two training-set sizes (rendered CIFAR-format data)"
  columns: [params_m, train_acc, val_acc, test_acc, gap, epochs, train_time, latency_ms, status]
"""


def stage_study(state: dict, cifar: str) -> None:
    """A small study through the train service: 3 models x 2 training-set sizes, benchmarked, reported."""
    from cli.studies import print_study
    from shared.grpc_client import channel
    from shared.pb import train_pb2, train_pb2_grpc
    from shared.settings import load_settings
    from shared.storage import open_store

    banner("5. a study")
    stub = train_pb2_grpc.TrainServiceStub(channel(state["train"]["address"]))
    study = stub.SubmitStudy(train_pb2.SubmitStudyRequest(spec_yaml=STUDY_SPEC.format(path=cifar)))
    print(f"  submitted study {study.study_id}: {len(study.trials)} trials, 2 at a time")
    done = 0
    for event in stub.WatchStudy(train_pb2.WatchStudyRequest(study_id=study.study_id)):
        if event.HasField("trial") and event.trial.state in ("SUCCEEDED", "FAILED", "CANCELLED", "PRUNED"):
            done += 1
            print(f"  [{done}/{len(study.trials)}] trial {event.trial.trial_id} {event.trial.state.lower()}"
                  + (f": {event.trial.message}" if event.trial.message else ""))
    study = stub.GetStudy(train_pb2.GetStudyRequest(study_id=study.study_id))
    report = open_store(load_settings().store_url).get_bytes(f"studies/{study.study_id}/report/report.md").decode()
    # The report's first table: the training results, one row per model and size.
    print("\n  " + report.split("### ", 2)[1].split("\n### ")[0].replace("\n", "\n  "))
    print_study(study)


def stage_captioner(state: dict, tinyllava: str, epochs: int = 24) -> None:
    import json
    import textwrap

    from tqdm import tqdm

    from shared.data.llava import read_llava
    from shared.grpc_client import channel
    from shared.inference_client import InferenceClient
    from shared.modelcard import parse_model_ref, read_card
    from shared.pb import train_pb2, train_pb2_grpc
    from shared.settings import load_settings
    from shared.storage import open_store

    banner("6. the CAD captioner")
    stub = train_pb2_grpc.TrainServiceStub(channel(state["train"]["address"]))
    run = stub.SubmitRun(train_pb2.SubmitRunRequest(
        config_yaml=(REPO / "configs" / "cad_captioner.yaml").read_text(),
        overrides=[f"data.path={tinyllava}", f"epochs={epochs}", "data.train_eval_size=120",
                   "caption.eval_samples=60", "caption.max_new_tokens=160", "experiment=demo-cad",
                   "scheduler.warmup_steps=10"]))
    bar = tqdm(desc=f"  {run.run_id}", total=epochs, unit="epoch")
    for event in stub.WatchRun(train_pb2.WatchRunRequest(run_id=run.run_id)):
        if event.HasField("epoch"):
            bar.n = event.epoch.epoch
            bar.set_postfix(val_loss=f"{event.epoch.metrics.get('val_loss', 0):.3f}")
    bar.close()
    run = stub.GetRun(train_pb2.GetRunRequest(run_id=run.run_id))
    if run.state != train_pb2.RUN_STATE_SUCCEEDED:
        raise SystemExit(f"run {run.run_id} ended {train_pb2.RunState.Name(run.state)}: {run.message}")
    ref = parse_model_ref(run.model_uri)
    m = read_card(open_store(load_settings().store_url), ref.name, ref.version).metrics
    print(f"  held-out CAD models (test split): loss {m['test_loss']:.3f} nats/token with the true views, "
          f"{m['test_loss_shuffled']:.3f} with another part's (gap {m['test_image_gap']:.4f}); extrusion count "
          f"{m['test_extrusion_acc']:.0%} (training majority: {m['test_extrusion_majority_acc']:.0%}); "
          f"chrF {m['test_chrf']:.1f}, BLEU {m['test_bleu']:.1f}")
    client = InferenceClient(state["inference"]["address"])
    client.load_model(ref.name, ref.version)
    dataset = read_llava(tinyllava)
    records = dataset.records["val"][:3]  # the converter's held-out models: this run's test split
    blobs = [dataset.image_store.get_bytes(f"{dataset.image_prefix}/images/{r['image']}") for r in records]
    texts = client.describe(ref.name, blobs, version=ref.version)
    for record, text in zip(records, texts, strict=True):
        truth = record["conversations"][1]["value"]
        print(f"\n  {record['image']}\n  generated: " + textwrap.fill(text, 110, subsequent_indent=" " * 13)
              + "\n  truth:     " + textwrap.fill(truth, 110, subsequent_indent=" " * 13))
    print(f"\n  (served by {state['inference']['address']} as {json.dumps(run.model_uri)}, text over gRPC)")


def main() -> int:
    from cli.local_stack import down

    home = REPO / ".trainyard" / "demo"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    os.environ["TRAINYARD_HOME"] = str(home)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TRAINYARD_PROGRESS", "0")
    start = time.monotonic()
    # SIGTERM (a CI timeout, `kill`) must still stop the services through the `finally` below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        state = stage_services()
        data = stage_datasets(state, home / "data")
        runs = stage_training(state, data["digits"])
        stage_serving(state, runs, data["digits"])
        stage_study(state, data["cifar"])
        stage_captioner(state, data["tinyllava"])
    finally:
        banner("shutting down")
        print("  stopped: " + ", ".join(down()))
    print(f"\ndemo finished in {time.monotonic() - start:.0f}s; everything is under {home}")
    print(f"browse the runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
