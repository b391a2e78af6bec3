"""The training loop: config in, trained + checkpointed + exported model out.

Hot-loop rule: nothing in the per-step path synchronises with the host or logs. The task's per-batch sums
stay on the device and are read once per epoch; metrics, checkpoints, events, MLflow and Prometheus all
happen between epochs. bench/bench_train.py holds this to >= 90% of a bare PyTorch loop.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from timm.utils import ModelEmaV3

from services.train import checkpoint as ckpt
from services.train.config import TrainConfig
from services.train.engine import reporting
from services.train.engine.distributed import DistInfo, all_reduce, broadcast_int
from services.train.engine.export import build_card, export_model, model_uri
from services.train.engine.optim import LRSchedule, build_optimizer
from services.train.engine.state import RunState
from services.train.engine.tasks import Evaluation, Runtime, Task, build_task
from services.train.events import EventWriter, default_events_path
from shared.config import config_hash
from shared.errors import Cancelled, FailedPrecondition, InvalidArgument
from shared.logs import get_logger
from shared.models.pretrained import NO_BACKBONE, Pretrained, read_pretrained
from shared.names import validate_name

log = get_logger(__name__)


def backbone_config(cfg: TrainConfig, pretrained: Pretrained | None) -> TrainConfig:
    """The config the data is read with: a backbone's normalisation replaces the dataset's usual constants
    (the backbone learnt on inputs normalised its way) unless data.mean/std are set. The run's own config,
    and so its hash, stay as written."""
    if pretrained is None or not (pretrained.mean and pretrained.std) or cfg.data.mean or cfg.data.std:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"mean": pretrained.mean,
                                                                      "std": pretrained.std})})


@dataclass
class RunResult:
    run_id: str
    mlflow_run_id: str | None
    state: str
    epochs_done: int
    history: list[dict[str, float]]
    best_metric: float | None
    best_epoch: int | None
    model_name: str | None = None
    model_version: int | None = None
    final_weights_sha256: str = ""
    message: str = ""
    timings: list[dict[str, float]] = field(default_factory=list)
    # The final evaluation of the selected model: test_* figures, calibration.
    final_metrics: dict[str, float] = field(default_factory=dict)
    # Seconds after the last epoch: "evaluation" (the test split, calibration) and "finish" (logging, export).
    final_timings: dict[str, float] = field(default_factory=dict)


class Engine:
    """Runs one training run end to end. Construct, then ``run()``.

    ``store``: an ArtifactStore (checkpoints, events, exported model); ``tracking``: False turns MLflow off
    (benchmarks of the bare engine), else ``tracking_uri`` (default from settings).
    """

    def __init__(self, cfg: TrainConfig, run_id: str, *, store=None, events_path: str | Path | None = None,
                 tracking: bool = True, tracking_uri: str | None = None, dist: DistInfo | None = None,
                 export: bool | None = None, stop_flag=None):
        from shared.settings import load_settings
        from shared.storage import open_store

        self.cfg = cfg
        self.run_id = validate_name(run_id, "run id")
        self.settings = load_settings()
        self.store = store if store is not None else open_store(self.settings.store_url)
        self.dist = dist or DistInfo.from_env()
        self.tracking = tracking
        self.tracking_uri = tracking_uri
        self.do_export = cfg.export.enabled if export is None else export
        self.stop_flag = stop_flag  # callable -> True when the run should stop (SIGTERM)
        self.events: EventWriter | None = None
        if self.dist.is_main:
            self.events = EventWriter(events_path or default_events_path(run_id), run_id, self.store)
        self.timings: list[dict[str, float]] = []
        self._stages: int | str | None = None
        # Where the weights started (the card's ``backbone``); the weights themselves are not kept.
        self._backbone: dict = NO_BACKBONE

    # ------------------------------------------------------------ setup

    def _setup_runtime(self) -> Runtime:
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise FailedPrecondition("device=cuda but no CUDA device is available")
        device = torch.device(f"cuda:{self.dist.local_rank}" if want_cuda else "cpu")
        if want_cuda:
            torch.cuda.set_device(device)
        if self.dist.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if want_cuda else "gloo")
        # Same seed on every rank: identical initial weights (DDP also broadcasts them) and identical
        # shuffles, which the loader then shards by rank.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif want_cuda:
            torch.backends.cudnn.benchmark = True
        amp = cfg.amp and device.type == "cuda"
        if cfg.amp and not amp:
            log.info("amp requested but the device is CPU: training in float32", extra={"run_id": self.run_id})
        return Runtime(device=device, dist=self.dist, amp=amp, cache_root=self.settings.home / "cache" / "datasets",
                       store=self.store)

    def _build_model(self, task: Task, pretrained: Pretrained | None) -> tuple[torch.nn.Module, dict]:
        from shared.models import create_model

        lora = self.cfg.model.lora
        if lora is not None:
            # The published base, its kwargs and files (tokenizer) as they are; only the adapters will train.
            from shared.modelcard import load_published, parse_model_ref
            from shared.models.lm import add_lora

            ref = parse_model_ref(lora.base)
            base, card = load_published(self.store, ref.name, ref.resolve(self.store))
            if card.architecture != self.cfg.model.name:
                raise InvalidArgument(f"model.lora.base {lora.base} is a {card.architecture}, "
                                      f"not {self.cfg.model.name}")
            return add_lora(base, lora.target_modules, lora.r, lora.alpha, lora.dropout), dict(card.model_kwargs)
        model_kwargs = {**task.model_kwargs(), **self.cfg.model.kwargs}
        model = create_model(self.cfg.model.name, **model_kwargs)
        if pretrained is not None:
            from shared.models import load_state

            load_state(model, pretrained.state, pretrained.source)
        return model, model_kwargs

    def _read_pretrained(self) -> Pretrained | None:
        """The configured backbone weights (None without), read before the data so their normalisation can
        apply; a backbone trained at another input size is said in the log and recorded in the card."""
        ref = self.cfg.model.pretrained
        if not ref:
            return None
        pre = read_pretrained(ref, self.store)
        log.info("backbone weights", extra={"run_id": self.run_id, **pre.provenance})
        return pre

    def _apply_freeze(self, model: torch.nn.Module, epoch: int) -> bool:
        """Set which backbone stages train at ``epoch`` (runs with ``freeze_backbone``); True when that changed."""
        if not self.cfg.freeze_backbone:
            return False
        from shared.models import freeze_backbone, unfreeze_schedule

        if self._stages is None:
            freeze_backbone(model)
        schedule = {step.epoch: step.stages for step in self.cfg.unfreeze}
        stages = unfreeze_schedule(model, epoch, schedule)
        changed, self._stages = stages != self._stages, stages
        return changed

    # ------------------------------------------------------------ the run

    def run(self) -> RunResult:
        started = time.time()
        # Process-wide torch settings the run changes; restored so an in-process caller (tests, the
        # benchmark) is left as it was.
        saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
        try:
            return self._run()
        except BaseException as exc:
            state = "CANCELLED" if isinstance(exc, (Cancelled, KeyboardInterrupt)) else "FAILED"
            if self.events is not None:
                self.events.state(state, message=f"{type(exc).__name__}: {exc}",
                                  elapsed_s=round(time.time() - started, 3))
            raise
        finally:
            if self.events is not None:
                self.events.close()
            torch.set_num_threads(saved[0])
            torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
            torch.backends.cudnn.benchmark = saved[3]

    def _resume(self, model, optimizer, schedule) -> tuple[ckpt.Checkpoint | None, RunState]:
        """Load the newest complete checkpoint into the run's objects; (None, a fresh state) for a new run."""
        prefix = ckpt.latest_checkpoint(self.store, self.run_id) if self.dist.is_main else None
        if self.dist.enabled:
            # Rank 0 decides (a listing on each rank could race a prune); the others load the same epoch.
            epoch = broadcast_int(int(prefix.rsplit("-", 1)[1]) if prefix else -1, self.dist)
            prefix = ckpt.epoch_prefix(self.run_id, epoch) if epoch >= 0 else None
        if prefix is None:
            return None, RunState.initial(self.cfg)
        resumed = ckpt.load_checkpoint(self.store, prefix)
        model.load_state_dict(resumed.model_state)
        optimizer.load_state_dict(resumed.optimizer_state)
        if self._ema is not None:
            self._ema.module.load_state_dict(resumed.extra_states["ema"])
        state = RunState.from_dict(resumed.state)
        self._step = state.step
        schedule.load_state_dict(state.schedule)
        if self._scaler is not None and state.grad_scaler:
            self._scaler.load_state_dict(state.grad_scaler)
        return resumed, state

    def _run(self) -> RunResult:
        cfg, dist = self.cfg, self.dist
        runtime = self._setup_runtime()
        pretrained = self._read_pretrained()
        task = build_task(backbone_config(cfg, pretrained), runtime)
        task.load()
        if pretrained is not None and pretrained.input_size \
                and list(task.input_size) != list(pretrained.input_size):
            log.warning("fine-tuning at another input size than the backbone was trained at",
                        extra={"run_id": self.run_id, "input_size": list(task.input_size),
                               "backbone_input_size": pretrained.input_size})
        model, model_kwargs = self._build_model(task, pretrained)
        if pretrained is not None:
            self._backbone = pretrained.provenance
        elif cfg.model.lora is not None:
            self._backbone = {"source": f"lora:{cfg.model.lora.base}"}
        del pretrained  # its weights are in the model now: no second copy held for the whole run
        model.to(runtime.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        task.attach(model)
        optimizer = build_optimizer(cfg, model)  # before freezing: see build_optimizer
        self._apply_freeze(model, epoch=1)
        # The weights' moving average (timm), when asked for: validation, selection and the export use it.
        self._ema = ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup) if cfg.ema.enabled else None
        self._step = 0
        schedule = LRSchedule(cfg)
        batches = task.train_batches()
        # One scaler for the whole run (its scale adapts over many steps); checkpointed with the rest.
        self._scaler = torch.amp.GradScaler("cuda") if runtime.amp else None

        resumed, state = self._resume(model, optimizer, schedule)
        start_epoch = 1
        if resumed is not None:
            start_epoch = resumed.epoch + 1
            self._apply_freeze(model, epoch=start_epoch)
            if dist.is_main:
                self._repair_best(resumed)
            # RNG last: everything above must not consume random numbers after the restore.
            resumed.restore_rng()
            log.info("resuming", extra={"run_id": self.run_id, "from_epoch": resumed.epoch})

        train_model = self._wrap(model, runtime.device)
        tracker = reporting.open_tracker(cfg, self.run_id, self.tracking_uri, state, task.data_version) \
            if dist.is_main and self.tracking else None
        gauges = reporting.EpochGauges(cfg.experiment, self.run_id) if dist.is_main else None
        if self.events is not None:
            self.events.state("RUNNING", message="resumed" if resumed else "started",
                              mlflow_run_id=state.mlflow_run_id, epoch=start_epoch - 1, epochs=cfg.epochs,
                              world_size=dist.world_size)
        try:
            if tracker is not None and resumed is None:
                reporting.log_run_start(tracker, cfg, model, task, dist.world_size)
            # A restart of a run that already stopped early goes straight to the finish.
            epoch = start_epoch - 1
            for epoch in range(start_epoch, cfg.epochs + 1 if not state.stopped else start_epoch):
                if self.stop_flag is not None and self.stop_flag():
                    raise Cancelled(f"run {self.run_id} stopped before epoch {epoch}")
                if self._apply_freeze(model, epoch):
                    train_model = self._wrap(model, runtime.device)
                metrics, val = self._epoch(epoch, task, train_model, model, batches, optimizer,
                                           schedule.lr_at(epoch))
                t2 = time.perf_counter()
                schedule.observe(metrics)
                improved = self._select(epoch, state, metrics, val.artifacts)
                t3 = time.perf_counter()
                if dist.is_main:
                    self._end_epoch(epoch, model, optimizer, schedule, state, metrics, improved, tracker, gauges)
                t4 = time.perf_counter()
                self.timings.append({"epoch": epoch, "train": metrics["train_time"],
                                     "eval": metrics["epoch_time"] - metrics["train_time"], "overhead": t4 - t2,
                                     "checkpoint_and_logging": t4 - t3})
                if state.stopped:
                    log.info(state.stopped, extra={"run_id": self.run_id})
                    break
            result = RunResult(self.run_id, state.mlflow_run_id, "SUCCEEDED", epoch, state.history,
                               state.best_metric, state.best_epoch, message=state.stopped, timings=self.timings)
            result.final_weights_sha256 = hashlib.sha256(ckpt.state_dict_bytes(model)).hexdigest()
            t0 = time.perf_counter()
            weights, final, fresh = self._final_evaluation(task, model, state)
            t1 = time.perf_counter()
            result.final_metrics = final.metrics
            if dist.is_main:
                self._finish(result, task, model_kwargs, state, tracker, weights, final, fresh)
            result.final_timings = {"evaluation": t1 - t0, "finish": time.perf_counter() - t1}
        except BaseException as exc:
            if tracker is not None:
                tracker.__exit__(*sys.exc_info())
            if gauges is not None:
                gauges.end(exc)
            raise
        if tracker is not None:
            tracker.close()
        if gauges is not None:
            gauges.end()
        if dist.enabled:
            torch.distributed.barrier()
        if self.events is not None:
            self.events.state("SUCCEEDED", message=state.stopped, mlflow_run_id=state.mlflow_run_id,
                              epoch=result.epochs_done, epochs=cfg.epochs,
                              model_uri=model_uri(result.model_name, result.model_version),
                              metrics=_flat({**(state.history[-1] if state.history else {}), **result.final_metrics}))
        return result

    def _wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        # DDP registers only parameters that require grad when it is built, so it is rebuilt whenever
        # the unfreeze schedule changes what trains.
        if not self.dist.enabled:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # ------------------------------------------------------------ one epoch

    def _epoch(self, epoch: int, task: Task, train_model, model, batches, optimizer,
               lr: float) -> tuple[dict[str, Any], Evaluation]:
        """Train one epoch at ``lr`` and validate: the epoch's metrics and the validation's evaluation."""
        for g in optimizer.param_groups:
            g["lr"] = lr
        if self.events is not None:
            self.events.epoch_start(epoch, self.cfg.epochs)
        t0 = time.perf_counter()
        sums = self._train_epoch(task, train_model, batches, optimizer, epoch)
        t1 = time.perf_counter()
        eval_model = self._ema.module if self._ema is not None else model
        train_eval = task.evaluate(eval_model, "train")
        val = task.evaluate(eval_model, "val")
        t2 = time.perf_counter()
        metrics = {**task.epoch_metrics(sums, train_eval, val), "lr": lr, "epoch_time": t2 - t0, "train_time": t1 - t0,
                   "samples_per_second": sums["seen"] / max(t1 - t0, 1e-9)}
        return metrics, val

    def _train_epoch(self, task: Task, model, batches, optimizer, epoch: int) -> dict[str, float]:
        from tqdm import tqdm

        model.train()
        batches.set_epoch(epoch)
        rt = task.runtime
        sums: dict[str, Any] = {}
        show = self.dist.is_main and os.environ.get("TRAINYARD_PROGRESS", "1") != "0" and sys.stderr.isatty()
        bar = tqdm(total=len(batches), desc=f"epoch {epoch}", file=sys.stderr, disable=not show, leave=False)
        accumulate = self.cfg.accumulate_steps
        warmup_steps, lr = self.cfg.scheduler.warmup_steps, optimizer.param_groups[0]["lr"]
        last = len(batches) - 1
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            stepping = (i + 1) % accumulate == 0 or i == last
            # Between optimiser steps DDP need not all-reduce gradients: the last micro-batch does it.
            sync = model.no_sync() if self.dist.enabled and not stepping else contextlib.nullcontext()
            with sync:
                with rt.autocast():
                    loss, stats = task.step(model, batch)
                scaled = loss / accumulate if accumulate > 1 else loss
                (self._scaler.scale(scaled) if self._scaler is not None else scaled).backward()
            if stepping:
                if self._step < warmup_steps:
                    for g in optimizer.param_groups:
                        g["lr"] = lr * (self._step + 1) / warmup_steps
                self._optimizer_step(model, optimizer)
            for key, value in stats.items():  # on-device accumulation: no host sync per step
                sums[key] = sums[key] + value if key in sums else value
            bar.update(1)
        bar.close()
        keys = sorted(sums)
        totals = all_reduce(torch.stack([torch.as_tensor(sums[k], device=rt.device, dtype=torch.float64)
                                         for k in keys]), self.dist).tolist()
        out = dict(zip(keys, totals, strict=True))
        if not math.isfinite(out["loss_sum"]):
            raise FailedPrecondition(f"training diverged at epoch {epoch}: loss is {out['loss_sum']}")
        out["seen"] = int(out["seen"])
        return out

    def _optimizer_step(self, model, optimizer) -> None:
        scaler, clip = self._scaler, self.cfg.grad_clip
        if scaler is not None:
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._step += 1
        if self._ema is not None:
            self._ema.update(model.module if self.dist.enabled else model, step=self._step)

    def _select(self, epoch: int, state: RunState, metrics: dict[str, Any], artifacts: dict[str, Any]) -> bool:
        """Best checkpoint and early stopping; True when this epoch is the new best."""
        improved = state.best.update(metrics)
        if improved:
            state.best_epoch = epoch
            state.best_artifacts = {**artifacts, "metrics": {k: v for k, v in metrics.items() if k.startswith("val_")}}
        if state.early_stop is not None and not state.early_stop.update(metrics) \
                and state.early_stop.bad_epochs >= self.cfg.early_stopping.patience:
            state.stopped = f"early stopped at epoch {epoch}: {self.cfg.early_stopping.metric} did not " \
                            f"improve for {self.cfg.early_stopping.patience} epochs"
        state.history.append(reporting.history_row(metrics, epoch))
        return improved

    # ------------------------------------------------------------ checkpoint, logging

    def _repair_best(self, resumed: ckpt.Checkpoint) -> None:
        """A crash between publishing epoch-N and best/ leaves best/ unpublished: rebuild it from epoch-N."""
        best_epoch = resumed.state.get("best_epoch")
        prefix = ckpt.best_prefix(self.run_id)
        current = self.store.read_manifest(prefix).meta.get("epoch") if self.store.is_published(prefix) else None
        if best_epoch == resumed.epoch and current != best_epoch:
            files = {name: self.store.get_verified(resumed.prefix, name)
                     for name in self.store.read_manifest(resumed.prefix).files}
            ckpt.publish_best(self.store, self.run_id, files, resumed.epoch)

    def _end_epoch(self, epoch, model, optimizer, schedule, state: RunState, metrics, improved, tracker,
                   gauges) -> None:
        cfg = self.cfg
        if cfg.checkpoint.every_epoch or improved or epoch == cfg.epochs:
            state.schedule = schedule.state_dict()
            state.config_hash = config_hash(cfg)
            state.grad_scaler = self._scaler.state_dict() if self._scaler is not None else None
            state.step = self._step
            prefix = ckpt.save_checkpoint(self.store, self.run_id, epoch, model, optimizer, state.to_dict(),
                                          best=improved, keep=cfg.checkpoint.keep_last,
                                          extra={"ema": self._ema.module} if self._ema is not None else None)
            self.events.emit("checkpoint", epoch=epoch, prefix=prefix, best=improved)
        flat = _flat(metrics)
        self.events.epoch(epoch, cfg.epochs, flat)
        if tracker is not None:
            tracker.log_metrics(flat, step=epoch)
        if gauges is not None:
            gauges.push(epoch, metrics)
        log.info("epoch done", extra={"run_id": self.run_id, "epoch": epoch,
                                      **{k: round(v, 6) for k, v in flat.items() if k in reporting.GAUGES}})

    def _final_evaluation(self, task: Task, model: torch.nn.Module,
                          state: RunState) -> tuple[bytes, Evaluation, bool]:
        """The selected weights (the best checkpoint's, or its moving average), the task's one final
        evaluation of them (the test split, calibration) and whether it ran now. On every rank (evaluation
        shards across them); a restarted finished run reuses the stored result, so test figures are computed
        and logged once per run."""
        if self.dist.enabled:
            torch.distributed.barrier()  # rank 0 may still be publishing the last best/
        best_prefix = ckpt.best_prefix(self.run_id)
        weights_file = "ema.safetensors" if self._ema is not None else "model.safetensors"
        if self.store.is_published(best_prefix):
            weights = self.store.get_verified(best_prefix, weights_file)
        else:
            weights = ckpt.state_dict_bytes(self._ema.module if self._ema is not None else model)
        stored = f"runs/{self.run_id}/final_evaluation.json"
        if self.store.exists(stored):
            done = json.loads(self.store.get_bytes(stored))
            return weights, Evaluation(done["metrics"], done["artifacts"]), False
        model.load_state_dict(st_load(weights))  # the loop is over: the model becomes the selected one
        final = task.final_evaluation(model)
        if self.dist.is_main:
            self.store.put_bytes(stored, json.dumps({"metrics": final.metrics, "artifacts": {
                k: v for k, v in final.artifacts.items() if k != "logits"}}).encode())
        return weights, final, True

    def _finish(self, result: RunResult, task: Task, model_kwargs: dict, state: RunState, tracker, weights: bytes,
                final: Evaluation, fresh: bool) -> None:
        """Log the final figures and the selected model; publish + register the export."""
        card = build_card(self.cfg, task, model_kwargs, state, self.run_id, final, self._backbone)
        files = task.export_files()
        if self.cfg.model.lora is not None:
            # Served as one plain model (the adapters folded in); the adapter is published beside it, and
            # shared.models.lm.load_published_adapter puts it back onto its base.
            from shared.models.lm import adapter_files, merged_state

            files.update(adapter_files(task.model))
            weights = st_save(merged_state(task.model))
            card = card.model_copy(update={"base_model": self.cfg.model.lora.base,
                                           "lora": self.cfg.model.lora.model_dump()})
        # The card lists exactly the files published beside the weights.
        card = card.model_copy(update={"files": sorted(files)})
        if tracker is not None and fresh:
            reporting.log_run_end(tracker, self.cfg, task, state, final)
        if not self.do_export:
            if tracker is not None:
                reporting.log_model(tracker, card, weights, files)
            return
        result.model_name, result.model_version, published = export_model(self.store, self.cfg, card, weights,
                                                                           tracker, files)
        if published:
            self.events.emit("model", name=result.model_name, version=result.model_version,
                             uri=model_uri(result.model_name, result.model_version))
        if self.cfg.benchmark.enabled and fresh:
            from services.train.benchmarking import benchmark_run

            measured = benchmark_run(self.cfg, result, tracker)
            if measured is not None:
                self.events.emit("benchmark", error=measured.error or "", seconds=measured.duration_s or 0.0)


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
