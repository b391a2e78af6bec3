"""CAD captioner training throughput: the platform (TrainEngine + CaptioningTask) against a bare PyTorch loop over
the same tensors, at batch 32, and the captioner's cost per generated token.

    .venv/bin/python bench/bench_captioner.py [--models 400] [--epochs 2] [--threads 2] [--data PATH]

Renders ``--models`` synthetic CAD models (three views each, 128 px) and converts them (the converter's split:
20% of the models held out), unless ``--data`` names a converted dataset. Then, alternately:
- bare: the training records encoded and collated once into batches of shuffled records (as the platform draws
  them), the views decoded once into pre-normalised float tensors, the batch order shuffled per epoch; forward,
  the same loss (text and facts heads), backward, clipping, AdamW step, nothing else;
- platform: the real Engine (batches re-drawn every epoch, collated, shifted and normalised; per-epoch
  validation with true and shuffled images; checkpoints), its samples/s over each epoch's training time.
Both with ``--threads`` intra-op threads (default 2: the machine's two cores).
Two alternating rounds; each side's best epoch counts. Targets: platform >= 220 samples/s and >= 90% of bare.
Also printed: the bare loop over batches of globally sorted lengths (the least padding there can be), which the
platform no longer trains on (``services.train.engine.tasks.captioning._Batches`` says why): what shuffled
batches cost.
Generation: greedy decoding of 64 held-out views by a freshly built model (the weights do not change the cost per
token; untrained, every view runs to ``max_new_tokens``), in generated tokens/s and ms per token per view.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.train.config import parse_train_config  # noqa: E402
from services.train.engine import Engine  # noqa: E402
from services.train.engine.distributed import DistInfo  # noqa: E402
from services.train.engine.optim import build_optimizer  # noqa: E402
from services.train.engine.tasks import Runtime, build_task  # noqa: E402
from shared.models import count_params, create_model  # noqa: E402
from shared.text import collate  # noqa: E402

TARGET_SAMPLES_PER_S = 220


def config(data: Path, epochs: int, threads: int):
    return parse_train_config({
        "experiment": "bench-captioner", "task": "captioning", "model": {"name": "cad_captioner"},
        "data": {"kind": "tinyllava", "path": str(data), "val_split": "holdout", "train_eval_size": 64},
        "caption": {"eval_samples": 16, "max_new_tokens": 64},
        "epochs": epochs, "batch_size": 32, "num_threads": threads,
        "optimizer": {"name": "adamw", "lr": 0.005, "weight_decay": 0.01}, "grad_clip": 1.0,
        "checkpoint": {"keep_best_metric": "val_loss", "mode": "min"}, "export": {"enabled": False}})


def render(root: Path, models: int) -> Path:
    from tests.test_captioning import render_and_convert

    return render_and_convert(root, models)


def bare(cfg, task, epochs: int, sort_by_length: bool = False) -> float:
    """Best-epoch samples/s of the plainest loop over batches collated once, images normalised once."""
    torch.manual_seed(0)
    model = create_model(cfg.model.name, **task.model_kwargs())
    optimizer = build_optimizer(cfg, model)
    split, bs = task.train, cfg.batch_size
    order = list(range(len(split)))
    random.Random(0).shuffle(order)
    if sort_by_length:
        order.sort(key=lambda i: len(split.examples[i].input_ids))
    images = task.model_input(split.images)
    batches = []
    for s in range(0, len(order), bs):
        rows = order[s:s + bs]
        b = collate([split.examples[i] for i in rows], task.tokenizer.pad_id)
        batches.append((images[rows], b.input_ids, b.labels, split.facts[rows] if split.facts is not None else None))
    model.train()
    best = 0.0
    for _ in range(epochs):
        random.shuffle(batches)
        t0 = time.perf_counter()
        for x, ids, labels, facts in batches:
            loss = model.loss(x, ids, labels, facts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        best = max(best, len(split) / (time.perf_counter() - t0))
    return best


def generation(task, model) -> dict[str, float]:
    """Greedy decoding of 64 validation views in batches of 64 (as the final evaluation runs it), ``max_new_tokens``
    tokens each at most: generated tokens (EOS included) per second, and the cost per token per view."""
    from shared.text import prompt_ids

    rows = list(range(min(64, len(task.val))))
    tok = task.tokenizer
    prompts = [prompt_ids(task.val.records[i]["conversations"][0]["value"], tok) for i in rows]
    x = task.model_input(task.val.images[rows])
    t0 = time.perf_counter()
    ids = model.eval().generate(x, max_new_tokens=task.cfg.caption.max_new_tokens, bos_id=tok.bos_id,
                                eos_id=tok.eos_id, prompts=prompts, pad_id=tok.pad_id)
    seconds = time.perf_counter() - t0
    tokens = int(sum(min(len(r), r.index(tok.eos_id) + 1 if tok.eos_id in r else len(r)) for r in ids.tolist()))
    return {"views": len(rows), "generated_tokens": tokens, "generated_tokens_per_s": round(tokens / seconds, 1),
            "ms_per_token_per_view": round(1000 * seconds / tokens, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", help="a converted TinyLLaVA dataset (default: render --models)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-captioner-") as tmp:
        root = Path(tmp)
        data = Path(args.data) if args.data else render(root, args.models)
        cfg = config(data, args.epochs, args.threads)
        task = build_task(cfg, Runtime(torch.device("cpu"), DistInfo(), False, root / "home"))
        task.load()
        model = create_model(cfg.model.name, **task.model_kwargs())
        task.attach(model)
        # Two alternating rounds, the best of each side: a training loop run early in the process runs slower
        # than the same loop run later (measured: the platform at 471 samples/s run first, 483 after a bare loop;
        # the bare loop 438 after a bare warm-up, 485 after the platform), which favoured whichever side ran last.
        bare_sps = plat_sps = 0.0
        for r in range(2):
            bare_sps = max(bare_sps, bare(cfg, task, args.epochs))
            result = Engine(cfg, f"bench-captioner-{r}", store=_store(root), tracking=False).run()
            plat_sps = max(plat_sps, *(h["samples_per_second"] for h in result.history))
        sorted_sps = bare(cfg, task, args.epochs, sort_by_length=True)
        gen = generation(task, model)
    print(json.dumps({
        "train_records": len(task.train), "mean_answer_tokens": task.data_params()["mean_answer_tokens"],
        "params": count_params(model), "threads": args.threads, "batch_size": cfg.batch_size,
        "bare_samples_per_s": round(bare_sps, 1), "platform_samples_per_s": round(plat_sps, 1),
        "platform_vs_bare": round(plat_sps / bare_sps, 3),
        "bare_length_sorted_batches_samples_per_s": round(sorted_sps, 1), "generation_greedy": gen,
        "targets": {"platform_samples_per_s": f">= {TARGET_SAMPLES_PER_S}", "platform_vs_bare": ">= 0.90"},
    }, indent=1))


def _store(root: Path):
    from shared.storage import open_store

    return open_store(root / "store")


if __name__ == "__main__":
    main()
