"""``trainyard bench``: params, FLOPs, latency, throughput, peak memory and int8 figures of models."""
from __future__ import annotations

import argparse

from cli.models import parse_input_size
from cli.output import add_output_options, emit, note
from shared.errors import InvalidArgument


def parse_int_list(text: str) -> list[int]:
    """``"1,32"`` -> [1, 32]."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise InvalidArgument(f"{text!r} is not a comma-separated list of integers") from exc


def _run(args) -> int:
    from tqdm import tqdm

    from services.benchmark.report import to_markdown, write_tables
    from services.benchmark.runner import make_request, run_benchmarks

    request = make_request(
        models=[m for m in args.models.split(",") if m],
        input_shape=parse_input_size(args.input) if args.input else None,
        batch_sizes=parse_int_list(args.batch_sizes), num_classes=args.num_classes, threads=args.threads,
        device=args.device, quantize=not args.no_quantize, dataset=args.dataset, track=not args.no_tracking)
    bar = tqdm(total=len(request.models), desc="bench", unit="model", disable=args.no_progress)

    def report(done, _total, model, result):
        bar.n = done
        bar.set_postfix_str(model)
        bar.refresh()

    results = run_benchmarks(request, progress=report)
    bar.close()
    emit(args, [r.model_dump(mode="json") for r in results], lambda: to_markdown(results))
    if args.out:
        written = write_tables(results, args.out)
        note(args, "wrote " + ", ".join(str(p) for p in written.values()))
    return 1 if any(r.error for r in results) else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure models: params, FLOPs, latency, throughput, peak memory, int8")
    p.add_argument("--models", required=True, help="comma-separated zoo/timm names or store:models/NAME/VERSION")
    p.add_argument("--input", help="CxHxW of one sample (default 3x224x224, or the model card's)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: all usable cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dataset", help="MNIST IDX or CIFAR-10 folder: accuracy on its test split, fp32 vs int8")
    p.add_argument("--no-quantize", action="store_true", help="skip the int8 measurements")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--out", help="write the Markdown table here, with .csv and .png beside it")
    p.add_argument("--no-progress", action="store_true")
    add_output_options(p)
    p.set_defaults(func=_run)
