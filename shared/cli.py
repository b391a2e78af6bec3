"""The `trainyard` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from shared import logs
from shared.errors import TrainyardError


def _cmd_up(args) -> int:
    from shared.local_stack import up

    state = up(args.services or None, deadline_s=args.deadline)
    print(f"{'service':<10} {'gRPC':<18} {'metrics':<32} pid")
    for name, info in state.items():
        print(f"{name:<10} {info['address']:<18} {info['metrics']:<32} {info['pid']}")
    return 0


def _cmd_status(args) -> int:
    from shared.local_stack import status

    rows = status()
    print(f"{'service':<10} {'address':<18} health")
    for name, info in rows.items():
        print(f"{name:<10} {info['address']:<18} {info['health']}")
    return 0 if all(r["health"] == "SERVING" for r in rows.values()) else 1


def _cmd_down(args) -> int:
    from shared.local_stack import down

    stopped = down(grace_s=args.grace)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _train_stub(args):
    from shared.grpc_client import channel
    from shared.pb import train_pb2_grpc

    return train_pb2_grpc.TrainServiceStub(channel(args.server))


def _print_run(run) -> None:
    from shared.pb import train_pb2

    state = train_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")
    print(f"run {run.run_id}  {state}  backend={run.backend}  model={run.model}  epoch {run.epoch}/{run.epochs}")
    if run.metrics:
        print("  " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(run.metrics.items())))
    if run.message:
        print(f"  {run.message}")
    if run.mlflow_run_id:
        print(f"  mlflow run: {run.mlflow_run_id}")
    if run.model_uri:
        print(f"  model: {run.model_uri}")


def _watch(stub, run_id: str) -> int:
    """Follow a run with a progress bar over epochs; exit code 0 only when it succeeded."""
    from tqdm import tqdm

    from shared.pb import train_pb2

    bar = None
    last = None
    for event in stub.WatchRun(train_pb2.WatchRunRequest(run_id=run_id)):
        if event.HasField("run"):
            last = event.run
            if bar is None:
                bar = tqdm(total=last.epochs, initial=last.epoch, desc=run_id, unit="epoch")
            bar.set_postfix_str(train_pb2.RunState.Name(last.state).removeprefix("RUN_STATE_"))
        else:
            if bar is not None:
                bar.n = event.epoch.epoch
                m = event.epoch.metrics
                bar.set_postfix({k: f"{m[k]:.4f}" for k in ("train_loss", "val_acc") if k in m})
                bar.refresh()
    if bar is not None:
        bar.close()
    if last is not None:
        last = stub.GetRun(train_pb2.GetRunRequest(run_id=run_id))
        _print_run(last)
    return 0 if last is not None and last.state == train_pb2.RUN_STATE_SUCCEEDED else 1


def _cmd_train(args) -> int:
    from pathlib import Path

    from shared.errors import NotFound
    from shared.pb import train_pb2

    path = Path(args.config)
    if not path.is_file():
        raise NotFound(f"config file {path} does not exist")
    stub = _train_stub(args)
    run = stub.SubmitRun(train_pb2.SubmitRunRequest(
        config_yaml=path.read_text(), overrides=args.set, backend=args.backend or "", run_id=args.run_id or "",
        replicas=args.replicas))
    _print_run(run)
    return _watch(stub, run.run_id) if args.watch else 0


def _cmd_runs(args) -> int:
    from shared.pb import train_pb2

    stub = _train_stub(args)
    if args.action == "list":
        runs = stub.ListRuns(train_pb2.ListRunsRequest(limit=args.limit)).runs
        print(f"{'run id':<34} {'state':<10} {'backend':<10} {'model':<24} {'epoch':>7}  val_acc")
        for r in runs:
            state = train_pb2.RunState.Name(r.state).removeprefix("RUN_STATE_")
            acc = f"{r.metrics['val_acc']:.4f}" if "val_acc" in r.metrics else "-"
            print(f"{r.run_id:<34} {state:<10} {r.backend:<10} {r.model:<24} {r.epoch:>3}/{r.epochs:<3}  {acc}")
        return 0
    if not args.run_id:
        raise SystemExit(f"trainyard runs {args.action} needs a run id")
    if args.action == "show":
        _print_run(stub.GetRun(train_pb2.GetRunRequest(run_id=args.run_id)))
        return 0
    if args.action == "watch":
        return _watch(stub, args.run_id)
    _print_run(stub.CancelRun(train_pb2.CancelRunRequest(run_id=args.run_id)))
    return 0


def _cmd_render(args) -> int:
    from tqdm import tqdm

    from services.render.datasets import RenderSpec, render

    options = {"input": args.input, "image_size": args.image_size, "shard_size": args.shard_size,
               "test_count": args.test_count, "gzip": args.gzip, "val_per_class": args.val_per_class}
    bar = tqdm(desc=f"render {args.kind}", unit="item", disable=args.no_progress)
    if args.server:
        from shared.grpc_client import channel
        from shared.pb import render_pb2, render_pb2_grpc

        field = args.kind.replace("-", "_")
        kind_msg = {"cad": render_pb2.CadRender(input=args.input or "", image_size=args.image_size or 0),
                    "cad_synth": render_pb2.CadSynth(),
                    "trajectories": render_pb2.TrajectoryRender(shard_size=args.shard_size or 0),
                    "logos": render_pb2.LogoRender(image_size=args.image_size or 0,
                                                   val_per_class=args.val_per_class or 0),
                    "digits": render_pb2.DigitRender(test_count=args.test_count or 0, gzip=args.gzip)}[field]
        request = render_pb2.RenderRequest(out=args.out, count=args.count, seed=args.seed, workers=args.workers,
                                           resume=args.resume, **{field: kind_msg})
        last = None
        for progress in render_pb2_grpc.RenderServiceStub(channel(args.server)).Render(request):
            bar.total = progress.total or bar.total
            bar.n = progress.done
            bar.refresh()
            last = progress
        bar.close()
        print(f"published {last.outputs.get('dataset', args.out)}: {last.done} items, {last.failed} failed "
              f"in {last.elapsed_seconds:.1f}s")
        for failure in last.failures:
            print(f"  failed {failure.item}: {failure.reason}")
        return 0

    def report(done, total, _info):
        bar.total = total
        bar.n = done
        bar.refresh()

    spec = RenderSpec(kind=args.kind, out=args.out, count=args.count, seed=args.seed, workers=args.workers,
                      resume=args.resume, options=options)
    location, manifest = render(spec, report)
    bar.close()
    meta = manifest.meta or {}
    failures = meta.get("failures") or []
    print(f"published {location}: {len(manifest.files)} files, {manifest.total_size / 1e6:.1f} MB, "
          f"{meta.get('total', '?')} items, {len(failures)} failed")
    for failure in failures[:20]:
        print(f"  failed {failure.get('model_id')}: {failure.get('reason')}")
    return 0


def _cmd_convert(args) -> int:
    if args.action == "tinyllava":
        from services.convert.tinyllava import convert_tinyllava

        stats = convert_tinyllava(args.cad_json, args.images, args.out, split_file=args.split_file, seed=args.seed,
                                  val_fraction=args.val_fraction)
        print(f"wrote {stats.out}: {stats.models} models, {stats.records} records "
              f"(train {stats.train_records}, val {stats.val_records}, test {stats.test_records}) "
              f"in {stats.seconds:.2f}s; split: {stats.split_source}")
        for reason, n in stats.skipped.items():
            print(f"  skipped {n} models: {reason}")
        return 0
    if args.action == "validate":
        from services.convert.validate import validate_tinyllava

        report = validate_tinyllava(args.path)
        print(report)
        return 0 if report.ok else 1
    from services.convert.server import index_dataset

    kind = "image-folder" if args.action == "index-images" else "trajectories"
    location, index = index_dataset(kind, args.path, args.out or "")
    print(f"index published at {location}")
    if kind == "image-folder":
        for split, info in index["splits"].items():
            print(f"  {split}: {info['total']} images  " + "  ".join(f"{c}={n}" for c, n in info["counts"].items()))
    else:
        print(json.dumps({k: v for k, v in index.items() if k != "shards"}, indent=1, default=str))
    return 0


def _cmd_models(args) -> int:
    from shared.models.cli import cmd_models_list, cmd_models_summary

    if args.action == "list":
        print(cmd_models_list(args))
    else:
        if not args.name:
            raise SystemExit("trainyard models summary needs a model name")
        print(cmd_models_summary(args.name, args.input, args.num_classes))
    return 0


def _cmd_bench(args) -> int:
    from tqdm import tqdm

    from services.benchmark.report import to_markdown, write_tables
    from services.benchmark.runner import make_request, parse_int_list, parse_shape, run_benchmarks

    request = make_request(
        models=[m for m in args.models.split(",") if m], input_shape=parse_shape(args.input) if args.input else None,
        batch_sizes=parse_int_list(args.batch_sizes), num_classes=args.num_classes, threads=args.threads,
        device=args.device, quantize=not args.no_quantize, dataset=args.dataset, track=not args.no_tracking)
    bar = tqdm(total=len(request.models), desc="bench", unit="model", disable=args.no_progress)

    def report(done, _total, model, result):
        bar.n = done
        bar.set_postfix_str(model)
        bar.refresh()

    results = run_benchmarks(request, progress=report)
    bar.close()
    print(to_markdown(results))
    if args.out:
        written = write_tables(results, args.out)
        print("wrote " + ", ".join(str(p) for p in written.values()))
    return 1 if any(r.error for r in results) else 0


def _cmd_predict(args) -> int:
    from shared.inference_client import cmd_predict

    print(cmd_predict(args.server, args.model, args.version, args.images, top_k=args.top_k,
                      batch_size=args.batch_size))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainyard", description="experiment platform for small vision models")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start all five services locally on embedded defaults")
    p.add_argument("services", nargs="*", help="only these services")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds to wait for SERVING")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("status", help="print each service's health")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("down", help="stop the services `up` started")
    p.add_argument("--grace", type=float, default=20.0)
    p.set_defaults(func=_cmd_down)

    train_addr = os.environ.get("TRAINYARD_TRAIN_SERVER", "127.0.0.1:50053")
    p = sub.add_parser("train", help="submit a training run to the train service")
    p.add_argument("--config", required=True, help="YAML training config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--backend", choices=["local", "kubernetes"], help="default: the server's")
    p.add_argument("--replicas", type=int, default=1, help="data-parallel processes / pods")
    p.add_argument("--run-id", help="resume this run from its newest checkpoint")
    p.add_argument("--watch", action="store_true", help="follow the run with a progress bar until it ends")
    p.add_argument("--server", default=train_addr, help="train service address")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("models", help="list the model zoo, or print a model's layer-by-layer summary")
    p.add_argument("action", choices=["list", "summary"])
    p.add_argument("name", nargs="?", help="summary: the model name")
    p.add_argument("--input", default="1x28x28", help="summary: input size CxHxW")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--pattern", help="list: only names matching this glob")
    p.add_argument("--timm", action="store_true", help="list: include timm's models")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("render", help="render a dataset (CAD views, trajectories, logos, digits)")
    p.add_argument("kind", choices=["cad", "cad-synth", "trajectories", "logos", "digits"])
    p.add_argument("--out", required=True, help="dataset location: a path, file://… or s3://bucket/prefix")
    p.add_argument("--count", type=int, default=0, help="items to render (0: the kind's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--resume", action="store_true", help="continue a killed render after its last complete shard")
    p.add_argument("--input", help="cad: folder or store URL of DeepCAD JSON files")
    p.add_argument("--image-size", type=int, help="cad / logos image side in pixels")
    p.add_argument("--shard-size", type=int, help="trajectories: samples per shard")
    p.add_argument("--test-count", type=int, help="digits: test split size")
    p.add_argument("--val-per-class", type=int, help="logos: validation images per class")
    p.add_argument("--gzip", action="store_true", help="digits: write .gz IDX files")
    p.add_argument("--server", help="render through this RenderService instead of in this process")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("convert", help="convert datasets (TinyLLaVA), validate them, index them")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("tinyllava", help="DeepCAD JSON + rendered views -> TinyLLaVA conversation JSON")
    c.add_argument("--cad-json", required=True, help="folder or store URL of DeepCAD JSON files")
    c.add_argument("--images", required=True, help="the rendered CAD dataset (trainyard render cad)")
    c.add_argument("--out", required=True)
    c.add_argument("--split-file", help="DeepCAD split JSON with train / validation / test keys")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--val-fraction", type=float, default=0.1)
    c = csub.add_parser("validate", help="check a TinyLLaVA dataset; exits non-zero on any problem")
    c.add_argument("path")
    for action, what in (("index-images", "an image folder"), ("index-trajectories", "trajectory shards")):
        c = csub.add_parser(action, help=f"index {what} for the trainer")
        c.add_argument("path", help="the published dataset")
        c.add_argument("--out", help="where to publish the index (default: <path>-index)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("bench", help="measure models: params, FLOPs, latency, throughput, peak memory, int8")
    p.add_argument("--models", required=True, help="comma-separated zoo/timm names or store:models/NAME/VERSION")
    p.add_argument("--input", help="CxHxW of one sample (default 3x224x224, or the model card's)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: all usable cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dataset", help="MNIST IDX or CIFAR-10 folder: measure accuracy, fp32 vs int8")
    p.add_argument("--no-quantize", action="store_true", help="skip the int8 measurements")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--out", help="write the Markdown table here, with .csv and .png beside it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("predict", help="classify images with a served model (Open Inference Protocol)")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--server", default=os.environ.get("TRAINYARD_INFERENCE_SERVER", "127.0.0.1:50055"))
    p.add_argument("--model", required=True)
    p.add_argument("--version", help="default: the newest loaded version")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32, help="images per request")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("runs", help="list, show, watch or cancel training runs")
    p.add_argument("action", choices=["list", "show", "watch", "cancel"])
    p.add_argument("run_id", nargs="?")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--server", default=train_addr, help="train service address")
    p.set_defaults(func=_cmd_runs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    try:
        return args.func(args) or 0
    except TrainyardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print(f"error: service unreachable ({exc.details()}); start it with `trainyard up` or pass --server",
                  file=sys.stderr)
        else:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
