"""Evaluation metrics, one definition for every table the platform prints.

Classification metrics come from a (true x predicted) confusion matrix and follow scikit-learn's
definitions (``precision_recall_fscore_support`` with ``zero_division=0``): a class's precision is 0 when
it is never predicted, its recall 0 when it never occurs, and the macro averages run over every class
that occurs in the labels or in the predictions (sklearn's default label set), so a class that is only
ever predicted, wrongly, pulls the macro precision down.

Calibration: the expected calibration error over 15 equal-width confidence bins (Guo et al., 2017; the
bin m holds confidences in ((m-1)/15, m/15]), kept as per-bin sums so that batches and ranks add up, and
temperature scaling fitted on validation logits. These are computed here rather than with a metrics
library because the engine accumulates them on the device across batches and ranks in the same pass
(and the same all-reduce) as its confusion matrix.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

ECE_BINS = 15


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w\-. ]", "_", name)


def classification_metrics(confusion: torch.Tensor, classes: list[str], prefix: str = "val") -> dict[str, float]:
    """Accuracy, macro + per-class precision/recall/F1 and per-class accuracy from a (true x pred) confusion
    matrix, named ``<prefix>_<metric>`` and ``<prefix>_<metric>/<class>``."""
    cm = confusion.double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    seen = (support > 0) | (predicted > 0)

    def macro(values: torch.Tensor) -> float:
        return float(values[seen].mean()) if seen.any() else 0.0

    out = {
        f"{prefix}_acc": float(tp.sum() / cm.sum().clamp(min=1)),
        f"{prefix}_precision": macro(precision),
        f"{prefix}_recall": macro(recall),
        f"{prefix}_f1": macro(f1),
    }
    for i, name in enumerate(classes):
        n = _safe_name(name)
        out[f"{prefix}_class_acc/{n}"] = float(recall[i])
        out[f"{prefix}_precision/{n}"] = float(precision[i])
        out[f"{prefix}_recall/{n}"] = float(recall[i])
        out[f"{prefix}_f1/{n}"] = float(f1[i])
    return out


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """(3, n_bins) float64 sums per confidence bin: sample count, summed confidence, summed correctness.

    Sums of batches (and of ranks) are the sums of the whole set, so the ECE of a split is exact however it
    was batched.
    """
    conf, pred = probs.max(dim=1)
    idx = (conf * n_bins).ceil().long().clamp_(1, n_bins) - 1
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=probs.device)
    out[0].index_add_(0, idx, torch.ones_like(conf, dtype=torch.float64))
    out[1].index_add_(0, idx, conf.double())
    out[2].index_add_(0, idx, (pred == labels).double())
    return out


def expected_calibration_error(bins: torch.Tensor) -> float:
    """sum over bins of (n_b / N) * |accuracy_b - confidence_b|."""
    count, conf, correct = (bins[i].double() for i in range(3))
    total = float(count.sum())
    if total == 0:
        return 0.0
    return float((correct - conf).abs().sum() / total)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` on held-out (validation) data.

    Optimised over log T with L-BFGS, as in Guo et al.; T > 1 softens an over-confident model.
    """
    # Clones: tensors made under inference_mode cannot take part in autograd.
    logits, labels = logits.detach().double().clone(), labels.detach().clone()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and t > 0 else 1.0


def regression_metrics(sq_err: torch.Tensor, abs_err: torch.Tensor, count: int, prefix: str, suffix: str = "",
                       axes: tuple[str, ...] = ("x", "y", "z")) -> dict[str, float]:
    """RMSE and MAE of a vector target (Euclidean: RMSE is the root of the mean squared distance, MAE the mean
    absolute error per coordinate) and per axis, from per-axis sums of squared and absolute errors over
    ``count`` samples: ``<prefix>_rmse<suffix>``, ``<prefix>_mae<suffix>``, ``<prefix>_rmse_<axis><suffix>``."""
    n = max(int(count), 1)
    sq, ab = sq_err.double().cpu() / n, abs_err.double().cpu() / n
    out = {f"{prefix}_rmse{suffix}": float(sq.sum().sqrt()), f"{prefix}_mae{suffix}": float(ab.mean())}
    for i, axis in enumerate(axes):
        out[f"{prefix}_rmse_{axis}{suffix}"] = float(sq[i].sqrt())
        out[f"{prefix}_mae_{axis}{suffix}"] = float(ab[i])
    return out


def probability_metrics(probs, labels, classes: list[str], split: str) -> dict[str, float]:
    """The metrics a trained network reports for a split, from class probabilities (N x K, a tensor or an
    array) and integer labels, for rows that are not networks (a feature baseline, an ensemble):
    ``<split>_loss`` (mean negative log-likelihood, probabilities clipped at float64's epsilon as
    scikit-learn's ``log_loss`` does), ``<split>_ece`` and everything ``classification_metrics`` names."""
    import numpy as np

    from shared.errors import InvalidArgument

    p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
    k = len(classes)
    if p.ndim != 2 or p.shape[1] != k:
        raise InvalidArgument(f"probabilities must be N x {k} (one column a class), got {tuple(p.shape)}")
    y = torch.as_tensor(np.asarray(labels))
    if p.shape[0] == 0 or y.shape != (p.shape[0],) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InvalidArgument(f"need N >= 1 probabilities and N integer labels, got {tuple(p.shape)} and "
                              f"{y.dtype} {tuple(y.shape)}")
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise InvalidArgument(f"labels must be in 0..{k - 1}, got {int(y.min())}..{int(y.max())}")
    confusion = torch.bincount(y * k + p.argmax(1), minlength=k * k).view(k, k)
    nll = -p.gather(1, y.unsqueeze(1)).clamp(min=torch.finfo(torch.float64).eps).log().mean()
    return {f"{split}_loss": float(nll), f"{split}_ece": expected_calibration_error(calibration_bins(p, y)),
            **classification_metrics(confusion, classes, prefix=split)}
