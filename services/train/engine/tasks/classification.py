"""Image classification from an in-memory dataset (MNIST IDX, CIFAR batches, image folders, synthetic)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from services.train.engine.data import DataBundle, load_data, make_train_loader
from services.train.engine.losses import Criterion, class_weights
from services.train.engine.tasks.base import ClassScores, Evaluation, Task, TrainBatches
from shared.plots import plot_confusion, plot_reliability
from shared.preprocess import Preprocessor


class ClassificationTask(Task):
    """Per epoch: the running training objective and accuracy come from the training steps themselves
    (``train_objective``, ``train_running_acc``: augmented batches, train mode); ``train_loss`` and
    ``train_acc`` are measured exactly like validation's (eval mode, no augmentation, plain cross-entropy) on a
    fixed sample of the training data, so ``overfit_gap = train_acc - val_acc`` compares like with like.
    """

    card_metrics = ("val_acc", "val_loss", "val_f1", "val_precision", "val_recall", "val_ece", "train_acc",
                    "train_loss", "overfit_gap", "epoch")

    def load(self) -> None:
        rt = self.runtime
        self.data: DataBundle = load_data(self.cfg.data, self.cfg.seed, rt.cache_root)
        self.classes = self.data.classes
        self.preprocess = Preprocessor(self.data.input_size, self.data.mean, self.data.std, rt.device)
        self.criterion = Criterion(self.cfg.loss.name, len(self.classes),
                                   class_weights(self.cfg, self.data.train_y, len(self.classes)),
                                   self.cfg.loss.label_smoothing, self.cfg.loss.focal_gamma).to(rt.device)
        self.memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    @property
    def data_version(self) -> str:
        return self.data.version

    def data_params(self) -> dict[str, Any]:
        d = self.data
        return {"train_samples": len(d.train_y), "val_samples": len(d.val_y),
                "test_samples": len(d.test_y) if d.test_y is not None else 0, "val_source": d.val_source,
                "train_eval_samples": len(d.split("train")[1])}

    @property
    def input_size(self) -> list[int]:
        return self.data.input_size

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": len(self.classes), "in_chans": self.data.input_size[0]}

    def train_batches(self) -> TrainBatches:
        return make_train_loader(self.cfg, self.data, self.runtime.dist, self.runtime.device)

    def step(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        # Upsampling on the device (small images for a large-input model), then the configured layout.
        x = self.preprocess.resize(x).contiguous(memory_format=self.memory_format)
        out = model(x)
        loss = self.criterion(out, y)
        hard = y if y.dim() == 1 else y.argmax(1)  # mixup/cutmix give soft targets
        return loss, {"loss_sum": loss.detach() * x.shape[0], "correct": (out.detach().argmax(1) == hard).sum(),
                      "seen": x.shape[0]}

    def epoch_metrics(self, sums: dict[str, float], train: Evaluation, val: Evaluation) -> dict[str, float]:
        seen = max(sums["seen"], 1)
        return {"train_objective": sums["loss_sum"] / seen, "train_running_acc": sums["correct"] / seen,
                **train.metrics, **val.metrics, "overfit_gap": train.metrics["train_acc"] - val.metrics["val_acc"]}

    @property
    def has_test(self) -> bool:
        return self.data.test_y is not None

    @property
    def val_source(self) -> str:
        return self.data.val_source

    @torch.inference_mode()
    def measure(self, model: torch.nn.Module, split: str, *, temperature: float = 1.0, keep_logits: bool = False,
                shard: bool = True) -> Evaluation:
        """Plain (unweighted, unsmoothed) CE loss, accuracy, ECE and (but for "train") the per-class metrics of
        the confusion matrix; each rank takes a strided shard and the sums are all-reduced, so every sample
        counts once."""
        rt = self.runtime
        x_u8, y = self.data.split(split)
        model.eval()
        bs = self.cfg.eval_batch_size or max(self.cfg.batch_size, 256)
        idx = torch.arange(rt.dist.rank, len(y), rt.dist.world_size) if shard else torch.arange(len(y))
        scores = ClassScores(self.classes, rt.device, temperature=temperature, keep_logits=keep_logits)
        for i in range(0, len(idx), bs):
            sel = idx[i:i + bs]
            xb = self.preprocess(x_u8[sel].to(rt.device, non_blocking=True))
            xb = xb.contiguous(memory_format=self.memory_format)
            with rt.autocast():
                out = model(xb).float()
            scores.add(out, y[sel].to(rt.device, non_blocking=True))
        if shard:
            scores.reduce(rt.dist)
        return scores.result(split, per_class=split != "train")

    def card_fields(self) -> dict[str, Any]:
        return {"classes": self.classes, "input_size": self.data.input_size,
                "normalization": {"mean": self.data.mean, "std": self.data.std}}

    def figures(self, history: list[dict[str, float]], best: dict[str, Any], final: Evaluation | None = None
                ) -> dict[str, Any]:
        figures = super().figures(history, best)
        if best.get("confusion") is not None:
            figures["confusion_matrix.png"] = plot_confusion(np.asarray(best["confusion"]), self.classes)
        if best.get("calibration") is not None:
            figures["reliability_val.png"] = plot_reliability(np.asarray(best["calibration"]), "validation")
        test = (final.artifacts.get("test") if final is not None else None) or {}
        if test:
            figures["confusion_matrix_test.png"] = plot_confusion(np.asarray(test["confusion"]), self.classes)
            figures["reliability_test.png"] = plot_reliability(np.asarray(test["calibration"]), "test")
        return figures
