"""Rows of a study's table that are not training runs, computed when its last trial has ended.

- ``baselines: [image_features]``: the non-neural classifier on hand-made image features
  (``services.train.studies.baselines``), fitted on the study's training split, scored on the same
  validation and test splits as every trial (the base config's data, read by the engine's own loader).
- ``ensemble: {top_k: k}``: the mean of the probabilities (each at its fitted temperature) of the k finished
  trials best on the study's objective (validation), scored on the same splits.
- The selected trial (best on the objective): its int8 variant scored on validation and test (the trial's
  benchmark measured its int8 size and latency), and a gallery of its misclassified test images with their
  confidences.

Everything goes to the study's parent MLflow run: ``extras/extras.json`` (what the report reads back) and
``extras/misclassified_test.png``, plus ``baseline_*`` / ``ensemble_*`` metrics for MLflow's own views, so
the report is still rebuilt from MLflow alone. A restarted study whose parent already holds the file does not
compute them again.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.train.studies.figures import png_bytes
from services.train.studies.results import ranked_trials
from services.train.studies.spec import StudySpec, Trial, trial_config
from shared.evaluation import probability_metrics
from shared.logs import get_logger

log = get_logger(__name__)

EXTRAS_FILE = "extras/extras.json"
GALLERY_FILE = "extras/misclassified_test.png"
GALLERY_MAX = 24
_EVAL_BATCH = 256


@torch.inference_mode()
def model_probs(model: torch.nn.Module, card, images: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities of a published model on uint8 images, fed as its card says, at its temperature."""
    from shared.preprocess import Preprocessor

    prep = Preprocessor.from_card(card)
    model.eval()
    out = [(model(prep(images[i:i + _EVAL_BATCH])).float() / card.temperature).softmax(1)
           for i in range(0, len(images), _EVAL_BATCH)]
    return torch.cat(out)


def _baseline_cost(baseline, images: torch.Tensor) -> dict[str, float]:
    """What the report puts beside a network's benchmark: batch-1 median and batched per-image latency of
    features + classifier, and the fitted pipeline's pickled size."""
    import pickle

    single = []
    for i in range(min(50, len(images))):
        started = time.perf_counter()
        baseline.predict_proba(images[i:i + 1])
        single.append(time.perf_counter() - started)
    batch = images[:_EVAL_BATCH]
    started = time.perf_counter()
    baseline.predict_proba(batch)
    batched = (time.perf_counter() - started) / len(batch)
    return {"bench_latency_p50_ms": 1000 * float(np.median(single)), "bench_batched_ms_per_image": 1000 * batched,
            "bench_size_fp32_mb": len(pickle.dumps(baseline)) / 2**20}


def _trial_uri(t) -> str:
    return t.tags.get("model_uri", "")


def compute_extras(spec: StudySpec, data, store, cache_root: Path) -> tuple[dict[str, Any], bytes | None]:
    """(extras.json's document, the gallery PNG or None) for a study whose trials have ended; ``data`` is the
    study's ``report.StudyData`` as read back from MLflow."""
    from services.train.engine.data import load_data
    from shared.modelcard import load_published, parse_model_ref

    base = trial_config(spec, Trial(trial_id="base", run_id="base", overrides={}, axes={}))
    bundle = load_data(base.data, base.seed, cache_root)
    classes = list(bundle.classes)
    splits = {"val": (bundle.val_x, bundle.val_y)}
    if bundle.test_x is not None:
        splits["test"] = (bundle.test_x, bundle.test_y)
    doc: dict[str, Any] = {"classes": classes, "rows": [], "selected": None,
                           "splits": {k: len(v[1]) for k, v in splits.items()}, "val_source": bundle.val_source}

    if "image_features" in spec.baselines:
        from services.train.studies.baselines import FEATURE_NAMES, fit_feature_baseline

        started = time.perf_counter()
        baseline = fit_feature_baseline(bundle.train_x, bundle.train_y, base.seed)
        fit_s = time.perf_counter() - started
        metrics: dict[str, float] = {"fit_s": fit_s, "train_samples": float(len(bundle.train_y))}
        for split, (x, y) in splits.items():
            metrics.update(probability_metrics(baseline.predict_proba(x), y, classes, split))
        metrics.update(_baseline_cost(baseline, bundle.val_x))
        classifier = type(baseline.pipeline[-1]).__name__
        doc["rows"].append({"kind": "baseline", "name": f"image features + {classifier}", "metrics": metrics,
                            "detail": f"{len(FEATURE_NAMES)} hand-made features: {', '.join(FEATURE_NAMES)}"})

    ranked = [t for t in ranked_trials(data) if _trial_uri(t)]
    loaded: dict[str, tuple[torch.nn.Module, Any]] = {}
    scored: dict[tuple[str, str], torch.Tensor] = {}

    def load(t):
        if t.trial_id not in loaded:
            ref = parse_model_ref(_trial_uri(t))
            loaded[t.trial_id] = load_published(store, ref.name, ref.version)
        return loaded[t.trial_id]

    def probs_of(t, split: str) -> torch.Tensor:
        """A trial's probabilities on a split, computed once (the ensemble and the gallery share them)."""
        if (t.trial_id, split) not in scored:
            scored[t.trial_id, split] = model_probs(*load(t), splits[split][0])
        return scored[t.trial_id, split]

    if spec.ensemble is not None and len(ranked) >= 2:
        members = ranked[:spec.ensemble.top_k]
        metrics = {}
        for split, (_, y) in splits.items():
            probs = torch.stack([probs_of(t, split) for t in members]).mean(0)
            metrics.update(probability_metrics(probs, y, classes, split))
        doc["rows"].append({"kind": "ensemble", "name": f"ensemble of the top {len(members)} (mean probabilities)",
                            "metrics": metrics, "members": [t.run_name or t.trial_id for t in members]})

    gallery = None
    if ranked:
        from shared.quantize import quantize_int8

        best = ranked[0]
        model, card = load(best)
        qmodel, layers = quantize_int8(model)
        int8: dict[str, float] = {"quantized_linear_layers": float(layers)}
        for split, (x, y) in splits.items():
            int8.update({k: v for k, v in probability_metrics(model_probs(qmodel, card, x), y, classes, split).items()
                         if k in (f"{split}_acc", f"{split}_ece")})
        doc["selected"] = {"trial_id": best.trial_id, "run_name": best.run_name, "model_uri": _trial_uri(best),
                           "int8": int8}
        if "test" in splits:
            x, y = splits["test"]
            gallery = misclassified_gallery(x, y, probs_of(best, "test"), classes,
                                            f"{best.run_name or best.trial_id}: misclassified test images")
    return doc, gallery


def misclassified_gallery(images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, classes: list[str],
                          title: str) -> bytes | None:
    """A grid of the most confidently wrong images (true, predicted, confidence); None when none is wrong."""
    from matplotlib.figure import Figure

    conf, pred = probs.max(1)
    wrong = torch.nonzero(pred != labels).flatten()
    if not len(wrong):
        return None
    wrong = wrong[conf[wrong].argsort(descending=True)][:GALLERY_MAX]
    cols = min(6, len(wrong))
    rows = (len(wrong) + cols - 1) // cols
    fig = Figure(figsize=(2 * cols, 2.3 * rows + 0.4))
    fig.suptitle(f"{title} ({int((pred != labels).sum())} of {len(labels)}; most confident first)", fontsize=9)
    for k, i in enumerate(wrong.tolist()):
        ax = fig.add_subplot(rows, cols, k + 1)
        img = images[i].permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(f"true {classes[int(labels[i])]}\npred {classes[int(pred[i])]} {100 * float(conf[i]):.0f}%",
                     fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return png_bytes(fig)


def log_extras(tracker, doc: dict[str, Any], gallery: bytes | None) -> None:
    """Write the extras to the parent run (the report reads them back from there)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "extras"
        root.mkdir()
        (root / "extras.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
        if gallery is not None:
            (root / "misclassified_test.png").write_bytes(gallery)
        tracker.log_artifact(str(root), "extras")
    flat = {}
    for row in doc["rows"]:
        for key in ("val_acc", "test_acc", "val_ece", "test_ece"):
            if key in row["metrics"]:
                flat[f"{row['kind']}_{key}"] = row["metrics"][key]
    if flat:
        tracker.log_metrics(flat, step=0)


def _extras_files(client, parent_run_id: str) -> set[str]:
    return {f.path for f in client.list_artifacts(parent_run_id, "extras")}


def extras_done(client, parent_run_id: str) -> bool:
    return EXTRAS_FILE in _extras_files(client, parent_run_id)


def read_extras(client, parent_run_id: str) -> tuple[dict[str, Any] | None, bytes | None]:
    names = _extras_files(client, parent_run_id)
    if EXTRAS_FILE not in names:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        doc = json.loads(Path(client.download_artifacts(parent_run_id, EXTRAS_FILE, tmp)).read_text())
        png = Path(client.download_artifacts(parent_run_id, GALLERY_FILE, tmp)).read_bytes() \
            if GALLERY_FILE in names else None
    return doc, png

