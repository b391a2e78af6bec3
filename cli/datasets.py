"""``trainyard render`` and ``trainyard convert``: datasets in this process or through the services."""
from __future__ import annotations

import argparse
import json
import os

from cli.output import add_output_options, emit
from services.render.jobs import DEFAULT_MAX_FAILURES, KINDS

# Every kind-specific render option, as the kinds name them (services.render.jobs.KINDS).
_OPTION_FLAGS = {
    "input": dict(help="cad: folder or store URL of DeepCAD JSON files"),
    "image_size": dict(type=int, help="cad / logos image side in pixels"),
    "shard_size": dict(type=int, help="trajectories: samples per shard"),
    "test_count": dict(type=int, help="digits / cifar-synth: test split size"),
    "val_per_class": dict(type=int, help="logos: validation images per class"),
    "test_per_class": dict(type=int, help="logos: test images per class (a test/ split; default none)"),
    "gzip": dict(action="store_true", help="digits: write .gz IDX files"),
}


def _render_via_server(args, options: dict, bar) -> int:
    from shared.grpc_client import channel
    from shared.pb import render_pb2, render_pb2_grpc

    kind = KINDS[args.kind]
    message = {name: options[name] for name in kind.options if options.get(name) is not None}
    request = render_pb2.RenderRequest(out=args.out, count=args.count, seed=args.seed, workers=args.workers,
                                       resume=args.resume, max_failures=args.max_failures, **{kind.field: message})
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


def _cmd_render(args) -> int:
    from tqdm import tqdm

    from services.render.datasets import RenderSpec, render

    options = {name: getattr(args, name) for name in _OPTION_FLAGS}
    bar = tqdm(desc=f"render {args.kind}", unit="item", disable=args.no_progress)
    if args.server:
        return _render_via_server(args, options, bar)

    def report(done, total, _info):
        bar.total = total
        bar.n = done
        bar.refresh()

    spec = RenderSpec(kind=args.kind, out=args.out, count=args.count, seed=args.seed, workers=args.workers,
                      resume=args.resume, options=options, max_failures=args.max_failures)
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
        emit(args, {"path": report.path, "ok": report.ok, "counts": report.counts, "problems": report.problems},
             str(report))
        return 0 if report.ok else 1
    from services.convert.indexes import index_dataset

    kind = "image-folder" if args.action == "index-images" else "trajectories"
    location, index = index_dataset(kind, args.path, args.out or "")
    print(f"index published at {location}")
    if kind == "image-folder":
        for split, info in index["splits"].items():
            print(f"  {split}: {info['total']} images  " + "  ".join(f"{c}={n}" for c, n in info["counts"].items()))
    else:
        print(json.dumps({k: v for k, v in index.items() if k != "shards"}, indent=1, default=str))
    return 0


def write_trajectory_sample(location: str, index: int, out: str) -> str:
    """One sample of a rendered trajectory dataset as ``out`` (.npz: video, label, class_name,
    future_position, positions), the file ``trainyard predict`` sends to a served trajectory model."""
    import numpy as np

    from shared.data.trajectories import TrajectoryShards, locate, read_index
    from shared.errors import InvalidArgument

    store, prefix = locate(location)
    meta = read_index(store, prefix)
    if not 0 <= index < meta["num_samples"]:
        raise InvalidArgument(f"sample {index} is outside the dataset's {meta['num_samples']} samples")
    # Only the shard that holds the sample is read (and verified).
    shard = next(s["index"] for s in meta["shards"] if s["start"] <= index < s["stop"])
    for item in TrajectoryShards(store, prefix, shards=[shard]):
        if int(item["index"]) == index:
            label = int(item["label"])
            np.savez(out, video=item["video"].numpy(), label=label, class_name=meta["classes"][label],
                     future_position=item["future_position"].numpy(), positions=item["positions"].numpy())
            return f"{out}: sample {index} ({meta['classes'][label]}) of {location}"
    raise InvalidArgument(f"sample {index} is not in {location}")


def _cmd_sample(args) -> int:
    print(write_trajectory_sample(args.path, args.index, args.out))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="write one sample of a trajectory dataset to a .npz file (for predict)")
    p.add_argument("path", help="the rendered trajectory dataset (path, file://, s3://, store:)")
    p.add_argument("--index", type=int, default=0, help="the sample's index in the dataset")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("render", help="render a dataset: " + "; ".join(f"{k.name}: {k.help}" for k in KINDS.values()))
    p.add_argument("kind", choices=list(KINDS))
    p.add_argument("--out", required=True, help="dataset location: a path, file://… or s3://bucket/prefix")
    limits = ", ".join(f"{k.name} {k.max_count:,}" for k in KINDS.values())
    p.add_argument("--count", type=int, default=0, help=f"items to render (0: the kind's default; at most {limits})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--resume", action="store_true", help="continue a killed render after its last complete shard")
    p.add_argument("--max-failures", default=DEFAULT_MAX_FAILURES,
                   help="items (CAD models) that may fail before the render is refused, as a count or a "
                        "percentage (default %(default)s); beyond it nothing is published and the command fails")
    for name, spec in _OPTION_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, **spec)
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
    add_output_options(c)
    for action, what in (("index-images", "an image folder"), ("index-trajectories", "trajectory shards")):
        c = csub.add_parser(action, help=f"index {what} for the trainer")
        c.add_argument("path", help="the published dataset")
        c.add_argument("--out", help="where to publish the index (default: <path>-index)")
    p.set_defaults(func=_cmd_convert)
