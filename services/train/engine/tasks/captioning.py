"""Image -> text: a captioner trained on a converted TinyLLaVA dataset (CAD views -> construction descriptions).

Splits, by CAD model (every record of a model, one per view, stays on one side; the converter splits by model
and this keeps it so):
- ``data.val_split: holdout`` (the shipped config): validation is ``data.val_fraction`` of the training
  records' models, drawn with the dataset's seed (every run on the dataset validates on the same models), and
  the converter's held-out ``val`` (and ``test``) models are the test split, evaluated once at the end;
- ``auto``: the converter's ``val`` validates and its ``test`` (when a split file made one) tests.

The tokenizer (byte-level BPE, ``shared.text``) is trained on the run's training text only and published beside
the weights. Training is teacher forcing with the loss on the answer tokens only (LLaVA's masking,
``shared.text.conversation``); images are shifted by up to ``caption.shift`` pixels (white padding, the views'
background), the only augmentation that keeps a view's meaning.

Every evaluation gives the cross-entropy per answer token with the true images (``<split>_loss``) and with
every record paired with another CAD model's image (``<split>_loss_shuffled``): their difference,
``<split>_image_gap``, is what the model reads from the image. At the end, descriptions are generated for
``caption.eval_samples`` held-out records and scored field by field (``shared.cad.descriptions``: extrusion
count beside the training majority's score on the same records, shape kind, operations, overall size within
10 %) and as text (sacreBLEU's BLEU and chrF), with a picture of views and their generated descriptions.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import random
from typing import Any

import numpy as np
import torch

from services.train.engine.tasks.base import Evaluation, Task, TrainBatches
from shared.cad.descriptions import parse_description, size_within
from shared.data.llava import LlavaDataset, read_llava
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.captioner import TOKENIZER_FILE, preprocess_images
from shared.plots import plot_captions, plot_curves
from shared.text import Example, Tokenizer, collate, encode_record, human_and_answer, record_texts, train_tokenizer

PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)  # (rgb / 255 - 0.5) / 0.5: shared.models.captioner.preprocess_images
GENERATE_BATCH = 64  # views decoded together at the end


def _shift(images: torch.Tensor, pixels: int, rng: random.Random) -> torch.Tensor:
    """Each image moved by up to ``pixels`` in x and y, the uncovered border white."""
    if pixels == 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pixels,) * 4, value=255)
    out = torch.empty_like(images)
    for i in range(n):
        dy, dx = rng.randint(0, 2 * pixels), rng.randint(0, 2 * pixels)
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


def _published_tokenizer(store, ref: str) -> Tokenizer:
    from shared.modelcard import model_prefix, parse_model_ref

    model = parse_model_ref(ref)
    return Tokenizer.from_bytes(store.get_verified(model_prefix(model.name, model.resolve(store)), TOKENIZER_FILE),
                                f"{ref}/{TOKENIZER_FILE}")


class _Split:
    """One split in memory: its records, uint8 images, encoded examples and the shuffled-image pairing."""

    def __init__(self, dataset: LlavaDataset, records: list[dict], examples: list[Example]):
        self.records, self.examples = records, examples
        self.images: torch.Tensor | None = None
        self.facts: torch.Tensor | None = None  # auxiliary targets of the model's, when it has any
        # Shuffled pairing: the records of model m read the images of model m + 1 (sorted ids), so no record ever
        # sees a view of its own part.
        by_model: dict[str, list[int]] = collections.defaultdict(list)
        for i, record in enumerate(records):
            by_model[dataset.model_id(record)].append(i)
        models = sorted(by_model)
        self.other = list(range(len(records)))
        if len(models) > 1:
            for m, model in enumerate(models):
                donor = by_model[models[(m + 1) % len(models)]]
                for j, i in enumerate(by_model[model]):
                    self.other[i] = donor[j % len(donor)]

    def __len__(self) -> int:
        return len(self.records)


class _Batches:
    """Uniformly shuffled batches; the order depends only on the seed and the epoch, so a resumed run sees the same
    batches.

    Not bucketed by length, though the GRU pays for every padded step: a description's length follows its part's
    extrusion count, so length-sorted batches each hold parts of one count, and the facts heads (and the image
    path of the text loss) then learn from batches whose gradient points at one class; the count head stayed at
    chance on validation and the image gap at 0.01 nats. Shuffled batches cost a fifth more time per sample
    (``bench/bench_captioner.py``: 487 against 590 samples/s in the bare loop)."""

    def __init__(self, task: CaptioningTask):
        self.task = task
        self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches = self._order()

    def _order(self) -> list[list[int]]:
        split, bs = self.task.train, self.task.cfg.batch_size
        idx = list(range(len(split)))
        random.Random(self.task.cfg.seed * 1_000_003 + self.epoch).shuffle(idx)
        batches = [idx[i:i + bs] for i in range(0, len(idx), bs)]
        dist = self.task.runtime.dist
        return batches[dist.rank::dist.world_size]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        # Assembled inline: 3 ms of a 110 ms step, and a background thread beside two intra-op threads on two
        # cores cost the trainer a third of its speed (measured: 196 against 305 samples/s).
        task = self.task
        rng = random.Random(task.cfg.seed * 7_919 + self.epoch)
        for rows in self.batches:
            batch = collate([task.train.examples[i] for i in rows], task.tokenizer.pad_id)
            images = _shift(task.train.images[rows], task.cfg.caption.shift, rng)
            yield {"images": task.model_input(images), "input_ids": batch.input_ids, "labels": batch.labels,
                   "facts": task.train.facts[rows] if task.train.facts is not None else None}


class CaptioningTask(Task):
    card_metrics = ("val_loss", "val_loss_shuffled", "val_image_gap", "val_perplexity", "train_loss",
                    "overfit_gap", "epoch")

    def load(self) -> None:
        cfg = self.cfg
        if cfg.data.subset is not None:
            raise InvalidArgument("data.subset does not apply to a TinyLLaVA dataset: convert the models to train on")
        self.dataset = ds = read_llava(cfg.data.path)
        seed = int(ds.meta.get("seed", 0))
        train = list(ds.records["train"])
        if cfg.data.val_split == "holdout":
            models = sorted({ds.model_id(r) for r in train})
            random.Random(seed).shuffle(models)
            held = set(models[:max(1, round(len(models) * cfg.data.val_fraction))])
            val = [r for r in train if ds.model_id(r) in held]
            train = [r for r in train if ds.model_id(r) not in held]
            test = ds.records["val"] + ds.records["test"]
            self._val_source = f"holdout: {len(held)} of the training split's CAD models (dataset seed {seed})"
        elif cfg.data.val_split == "auto":
            val, test = ds.records["val"], ds.records["test"]
            self._val_source = "the converter's val split (held-out CAD models)"
        else:
            raise InvalidArgument("a captioner validates on held-out CAD models: data.val_split is auto or holdout")
        if not train or not val:
            raise FailedPrecondition(f"{cfg.data.path}: {len(train)} training and {len(val)} validation records")
        if cfg.model.lora is not None:
            # LoRA tunes a published model: its tokenizer (and vocabulary) come with it.
            self.tokenizer = _published_tokenizer(self.runtime.store, cfg.model.lora.base)
        else:
            # The tokenizer sees the training text only: validation and test text stay unseen.
            self.tokenizer = train_tokenizer(record_texts(train), cfg.caption.vocab_size)
        encode = lambda records: [encode_record(r, self.tokenizer, cfg.caption.max_len) for r in records]  # noqa: E731
        self.train, self.val = _Split(ds, train, encode(train)), _Split(ds, val, encode(val))
        self.test = _Split(ds, test, encode(test)) if test else None
        counts = collections.Counter(parse_description(human_and_answer(r)[1]).extrusions for r in train)
        self.majority_extrusions = counts.most_common(1)[0][0]
        self.truncated = sum(e.truncated for e in self.train.examples)
        prompts = collections.Counter(human_and_answer(r)[0] for r in train)
        # Served requests carry no prompt: the card's is the training split's most common one.
        self.prompt = min(prompts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        self._version = hashlib.sha256(json.dumps({
            "records": ds.version, "val": sorted(r["id"] for r in val), "vocab": cfg.caption.vocab_size,
            "max_len": cfg.caption.max_len}).encode()).hexdigest()[:16]

    @property
    def data_version(self) -> str:
        return self._version

    def data_params(self) -> dict[str, Any]:
        return {"train_samples": len(self.train), "val_samples": len(self.val),
                "test_samples": len(self.test) if self.test else 0, "val_source": self.val_source,
                "vocab_size": self.tokenizer.vocab_size, "truncated_train_records": self.truncated,
                "train_eval_samples": min(self.cfg.data.train_eval_size, len(self.train)),
                "mean_answer_tokens": round(float(np.mean([sum(1 for t in e.labels if t >= 0)
                                                           for e in self.train.examples])), 1)}

    @property
    def input_size(self) -> list[int]:
        s = self.model.image_size
        return [3, s, s]

    def model_kwargs(self) -> dict[str, Any]:
        return {"vocab_size": self.tokenizer.vocab_size, "image_token_id": self.tokenizer.image_id}

    def attach(self, model: torch.nn.Module) -> None:
        super().attach(model)
        if not hasattr(model, "loss") or not hasattr(model, "describe"):
            raise InvalidArgument(f"{self.cfg.model.name} is not a captioning model (needs loss and describe)")
        model.tokenizer = self.tokenizer
        # A model with auxiliary heads reads its targets out of the answers (cad_captioner: the parts' facts).
        if hasattr(model, "fact_targets"):
            self.train.facts = model.fact_targets([human_and_answer(r) for r in self.train.records])
        size = model.image_size
        for split in (self.train, self.val, self.test):
            if split is not None:
                split.images = self.dataset.load_images(split.records, size, self.cfg.data.reader_threads)

    def export_files(self) -> dict[str, bytes]:
        return self.model.export_files()

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 views -> the float batch the model reads, exactly as served (shared.predict)."""
        return preprocess_images(images, self.model.image_size)

    @property
    def _eval_batch(self) -> int:
        return self.cfg.eval_batch_size or 2 * self.cfg.batch_size

    # ------------------------------------------------------------------ training

    def train_batches(self) -> TrainBatches:
        return _Batches(self)

    def step(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        dev = self.runtime.device
        images, ids, labels = (batch[k].to(dev, non_blocking=True) for k in ("images", "input_ids", "labels"))
        facts = batch["facts"].to(dev) if batch["facts"] is not None else None
        loss = model.loss(images, ids, labels, facts)
        tokens = (labels[:, 1:] >= 0).sum()
        n = ids.shape[0]
        return loss, {"loss_sum": loss.detach() * n, "token_loss_sum": loss.detach() * tokens, "tokens": tokens,
                      "seen": n}

    def epoch_metrics(self, sums: dict[str, float], train: Evaluation, val: Evaluation) -> dict[str, float]:
        return {"train_objective": sums["token_loss_sum"] / max(sums["tokens"], 1), **train.metrics,
                **val.metrics, "overfit_gap": val.metrics["val_loss"] - train.metrics["train_loss"]}

    # ------------------------------------------------------------------ evaluation

    @property
    def has_test(self) -> bool:
        return self.test is not None

    @property
    def val_source(self) -> str:
        return self._val_source

    def _split(self, name: str) -> _Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @torch.inference_mode()
    def _cross_entropy(self, model: torch.nn.Module, split: _Split, rows: list[int], shuffled: bool) -> float:
        dev, bs = self.runtime.device, self._eval_batch
        order = sorted(rows, key=lambda i: len(split.examples[i].input_ids))  # little padding
        total, count = 0.0, 0
        for s in range(0, len(order), bs):
            part = order[s:s + bs]
            batch = collate([split.examples[i] for i in part], self.tokenizer.pad_id)
            source = [split.other[i] for i in part] if shuffled else part
            labels = batch.labels.to(dev)
            k = int((labels[:, 1:] >= 0).sum())
            loss = model.loss(self.model_input(split.images[source]).to(dev), batch.input_ids.to(dev), labels)
            total += float(loss) * k
            count += k
        return total / max(count, 1)

    def measure(self, model: torch.nn.Module, split: str, *, temperature: float = 1.0, keep_logits: bool = False,
                shard: bool = True) -> Evaluation:
        """Per answer token: cross-entropy with the true images and with another model's images, their gap and
        the perplexity. "train" measures the first ``data.train_eval_size`` training records, in eval mode."""
        data = self._split(split)
        rows = list(range(min(len(data), self.cfg.data.train_eval_size) if split == "train" else len(data)))
        was_training = model.training
        model.eval()
        try:
            true = self._cross_entropy(model, data, rows, shuffled=False)
            other = self._cross_entropy(model, data, rows, shuffled=True)
            heads = self._facts_accuracy(model, data, rows) if hasattr(model, "fact_targets") else {}
        finally:
            model.train(was_training)
        return Evaluation({f"{split}_loss": true, f"{split}_loss_shuffled": other, f"{split}_image_gap": other - true,
                          f"{split}_perplexity": math.exp(min(true, 50.0)),
                          **{f"{split}_{k}": v for k, v in heads.items()}})

    @torch.inference_mode()
    def _facts_accuracy(self, model: torch.nn.Module, split: _Split, rows: list[int]) -> dict[str, float]:
        """The auxiliary heads' own extrusion-count accuracy (first group), straight from the image."""
        if split.facts is None:
            split.facts = model.fact_targets([human_and_answer(r) for r in split.records])
        dev, bs = self.runtime.device, self._eval_batch
        right = 0
        for s in range(0, len(rows), bs):
            part = rows[s:s + bs]
            logits = model.encode_images(self.model_input(split.images[part]).to(dev))["facts"]
            count = logits[:, :model.fact_groups[0]].argmax(1).cpu()
            right += int((count == split.facts[part, 0]).sum())
        return {"head_extrusion_acc": right / max(len(rows), 1)}

    def _eval_rows(self, split: _Split) -> list[int]:
        rows = list(range(len(split)))
        random.Random(0).shuffle(rows)  # a fixed sample, the same for every run on the dataset
        return sorted(rows[:self.cfg.caption.eval_samples])

    @torch.inference_mode()
    def generate(self, model: torch.nn.Module, split: _Split, rows: list[int]) -> list[str]:
        c, dev = self.cfg.caption, self.runtime.device
        texts: list[str] = []
        for s in range(0, len(rows), GENERATE_BATCH):
            part = rows[s:s + GENERATE_BATCH]
            prompts = [human_and_answer(split.records[i])[0] for i in part]
            texts += model.describe(self.model_input(split.images[part]).to(dev), prompts,
                                    max_new_tokens=c.max_new_tokens, num_beams=c.num_beams,
                                    length_penalty=c.length_penalty)
        return texts

    def describe_split(self, model: torch.nn.Module, name: str) -> tuple[dict[str, float], dict[str, Any]]:
        """Generated descriptions of the split's evaluation sample, scored against the truth."""
        import sacrebleu

        split = self._split(name)
        rows = self._eval_rows(split)
        generated = self.generate(model, split, rows)
        truth = [human_and_answer(split.records[i])[1] for i in rows]
        facts = [(parse_description(g), parse_description(t)) for g, t in zip(generated, truth, strict=True)]
        n = len(rows)
        m = {
            f"{name}_extrusion_acc": sum(p.extrusions == t.extrusions for p, t in facts) / n,
            f"{name}_extrusion_majority_acc": sum(t.extrusions == self.majority_extrusions for _, t in facts) / n,
            f"{name}_first_shape_acc": sum(p.shapes[:1] == t.shapes[:1] for p, t in facts) / n,
            f"{name}_operations_acc": sum(p.operations == t.operations for p, t in facts) / n,
            f"{name}_size_within_10pct": sum(size_within(p.size, t.size) for p, t in facts) / n,
            f"{name}_exact_match": sum(g == t for g, t in zip(generated, truth, strict=True)) / n,
            f"{name}_bleu": sacrebleu.corpus_bleu(generated, [truth]).score,
            f"{name}_chrf": sacrebleu.corpus_chrf(generated, [truth]).score,
            f"{name}_described": float(n),
        }
        shown = rows[:6]
        samples = {"images": split.images[shown].permute(0, 2, 3, 1).numpy().tolist(),
                   "generated": generated[:6], "truth": truth[:6],
                   "ids": [str(split.records[i]["id"]) for i in shown]}
        return m, samples

    def final_evaluation(self, model: torch.nn.Module) -> Evaluation:
        final = super().final_evaluation(model)
        name = "test" if self.has_test else "val"
        metrics, samples = self.describe_split(model, name)
        final.metrics.update(metrics)
        final.artifacts["descriptions"] = {"split": name, **samples}
        c = self.cfg.caption
        final.artifacts["card"]["generation"] = {"max_new_tokens": c.max_new_tokens, "num_beams": c.num_beams,
                                                 "length_penalty": c.length_penalty, "prompt": self.prompt}
        return final

    def card_fields(self) -> dict[str, Any]:
        return {"task": "captioning", "classes": [], "input_size": self.input_size,
                "normalization": {"mean": list(PIXEL_MEAN), "std": list(PIXEL_STD)}}

    def figures(self, history: list[dict[str, float]], best: dict[str, Any], final: Evaluation | None = None
                ) -> dict[str, Any]:
        figures = {"curves.png": plot_curves(history)}
        shown = (final.artifacts.get("descriptions") if final is not None else None) or {}
        if shown.get("images"):
            figures[f"descriptions_{shown['split']}.png"] = plot_captions(
                np.asarray(shown["images"], dtype=np.uint8), shown["generated"], shown["truth"],
                f"Generated descriptions of held-out views ({shown['split']} split)")
        return figures
