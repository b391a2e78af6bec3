"""The training config: one YAML file per experiment, validated strictly so a typo fails the run early."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from shared.config import load_config, parse_config
from shared.modelcard import Serving

# Upper bounds: what the service's int32 proto fields carry and what one run can mean. Past them a value is a
# typo or an attack: epochs=10**12 used to launch, and then no Run could be encoded for anyone.
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_SAMPLES = 100_000_000  # subsets and evaluation samples of a stored dataset
MAX_SYNTHETIC = 1_000_000  # synthetic splits are generated in memory
MAX_IMAGE_SIDE = 4096
MAX_SEED = 2**32 - 1  # numpy's seed range
NAME = Annotated[str, Field(min_length=1, max_length=128)]
METRIC = Annotated[str, Field(min_length=1, max_length=128)]
PATH = Annotated[str, Field(min_length=1, max_length=4096)]


class _Strict(BaseModel):
    # extra="forbid": a misspelt key ("learning_rate" for "lr") is an error, not a silently ignored default.
    # allow_inf_nan=False: YAML's .nan and .inf are floats too, and no field here means either.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraSpec(_Strict):
    """Fine-tune a published model with LoRA adapters (peft): only the adapters train, the base stays bitwise."""
    base: PATH  # the published base: store:models/<name>/<version> or models/<name>/<version>
    r: int = Field(8, ge=1, le=256)
    alpha: int | None = Field(None, ge=1, le=4096)  # default 2 r
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[NAME] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=256)


class ModelConfig(_Strict):
    name: NAME
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # Backbone weights to start from (transfer learning), never downloaded: a model the platform published
    # (store:models/<name>[/<version>]), whose input size and normalisation come with it, or a local
    # .safetensors/.pth file (shared.models.pretrained). A classifier that does not fit is left new.
    # ``pretrained_path``, its former name, is still read.
    pretrained: PATH | None = Field(None, validation_alias=AliasChoices("pretrained", "pretrained_path"))
    # LoRA fine-tuning of a published model of architecture ``name`` (its weights, kwargs and tokenizer).
    lora: LoraSpec | None = None

    @model_validator(mode="after")
    def _one_start(self) -> ModelConfig:
        if self.pretrained and self.lora:
            raise ValueError("model.pretrained and model.lora both name the weights to start from; give one")
        return self


class AugmentConfig(_Strict):
    crop: int = Field(0, ge=0, le=MAX_IMAGE_SIDE, description="random-crop padding in pixels; 0 = off")
    flip: bool = False
    rotation: float = Field(0.0, ge=0, le=180, description="max rotation in degrees")
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast/saturation strength")
    grayscale: float = Field(0.0, ge=0, le=1, description="probability of random grayscale")
    mixup: float = Field(0.0, ge=0, le=100, description="mixup Beta(alpha, alpha); 0 = off")
    cutmix: float = Field(0.0, ge=0, le=100, description="cutmix Beta(alpha, alpha); 0 = off")

    @property
    def enabled(self) -> bool:
        return any([self.crop, self.flip, self.rotation, self.color_jitter, self.grayscale,
                    self.mixup, self.cutmix])


class DataConfig(_Strict):
    kind: Literal["mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "trajectories", "tinyllava"]
    # A local directory, or a store URL/key prefix (file://..., s3://bucket/prefix) fetched to a cache first.
    path: PATH | None = None
    # Stratified training subset of this many samples (e.g. 5000 of CIFAR-10's 50000); None = all. It is
    # taken from what remains after validation is held out, so every subset size shares one validation set.
    subset: int | None = Field(None, gt=0, le=MAX_SAMPLES)
    # Seeds the validation hold-out and the subset; fixed per dataset (not the run's seed) so every run of a
    # study sees the same split.
    subset_seed: int = Field(0, ge=0, le=MAX_SEED)
    # Where validation comes from. "auto": the dataset's own val split when it has one, else val_fraction of
    # the training data (stratified); "holdout": always val_fraction of the training data; "test": validate
    # and select on the test split — an explicit choice, tagged on the run and shown in every table.
    val_split: Literal["auto", "holdout", "test"] = "auto"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    # Only for kind=trajectories (a rendered dataset without its own splits): the share of shards held out
    # for the test split; validation takes val_fraction. Shards are assigned by the dataset's own seed.
    test_fraction: float = Field(0.1, gt=0, lt=1)
    # Only for kind=trajectories: DataLoader worker processes streaming shards; 0 streams them in a background
    # thread of the training process (best on a few CPU cores: no inter-process hand-off).
    workers: int = Field(0, ge=0, le=32)
    # Only for kind=trajectories with workers=0: background threads reading shards, each its own.
    reader_threads: int = Field(2, ge=1, le=16)
    # Only for kind=trajectories: samples each reader holds for shuffling (memory: ~0.2 MB each as subsampled).
    shuffle_buffer: int = Field(64, ge=1, le=4096)
    # Only for kind=trajectories: keep the training split in memory after the first epoch when it fits in this
    # many MB (as the model reads it, ~0.2 MB a clip); 0 streams every epoch.
    cache_mb: int = Field(1024, ge=0, le=1_048_576)
    # Training accuracy and loss are measured like validation's (eval mode, no augmentation) on a fixed
    # stratified sample of this many training samples, so the overfitting gap compares like with like.
    train_eval_size: int = Field(5000, gt=0, le=MAX_SAMPLES)
    # Resize to this square size (image folders; upsampling 32x32 CIFAR for 224-input backbones).
    image_size: int | None = Field(None, gt=0, le=MAX_IMAGE_SIDE)
    # Per-channel normalisation; None = the dataset's usual constants.
    mean: list[float] | None = Field(None, min_length=1, max_length=64)
    std: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1, max_length=64)
    # Only for kind=cifar100: the 100 fine classes or the 20 coarse superclasses (unset: fine).
    labels: Literal["fine", "coarse"] | None = None
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # Only for kind=synthetic: generated class-dependent patterns (benchmarks, smoke tests).
    num_classes: int = Field(10, ge=2, le=100_000)
    channels: int = Field(1, ge=1, le=64)
    train_size: int = Field(2048, gt=0, le=MAX_SYNTHETIC)
    val_size: int = Field(512, gt=0, le=MAX_SYNTHETIC)
    test_size: int = Field(512, gt=0, le=MAX_SYNTHETIC)

    @model_validator(mode="after")
    def _needs_path(self) -> DataConfig:
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"data.path is required for data.kind={self.kind}")
        return self

    @model_validator(mode="after")
    def _label_set(self) -> DataConfig:
        if self.labels is not None and self.kind != "cifar100":
            raise ValueError(f"data.labels ({self.labels}) chooses CIFAR-100's label set; it applies only to "
                             f"data.kind=cifar100, not {self.kind}")
        if self.kind == "cifar100" and self.labels is None:
            self.labels = "fine"  # spelt out, so the run's recorded config says which label set it trained on
        return self


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    # timm's convention: no weight decay on biases, norm weights and the model's no_weight_decay() names.
    decay_norm_and_bias: bool = False  # True applies weight_decay to every parameter
    nesterov: bool = False
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)

    @model_validator(mode="after")
    def _nesterov(self) -> OptimizerConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("optimizer.nesterov needs name=sgd and momentum > 0")
        return self


class SchedulerConfig(_Strict):
    name: Literal["none", "step", "cosine", "plateau"] = "none"
    step_size: int = Field(10, gt=0, le=MAX_EPOCHS)
    gamma: float = Field(0.1, gt=0, le=1)
    # Linear warmup from lr/(warmup_epochs+1) up to lr over the first epochs (any scheduler).
    warmup_epochs: int = Field(0, ge=0, le=MAX_EPOCHS)
    # Linear warmup over the first optimiser steps, on top of the epoch's lr: attention models and large
    # learning rates need it within the first epoch, which per-epoch warmup cannot give.
    warmup_steps: int = Field(0, ge=0, le=1_000_000_000)
    min_lr: float = Field(0.0, ge=0, le=10)
    # plateau: multiply lr by factor after `patience` epochs without improvement of the monitored metric.
    patience: int = Field(3, ge=0, le=MAX_EPOCHS)
    factor: float = Field(0.1, gt=0, lt=1)
    threshold: float = Field(1e-4, ge=0, le=1e6)
    metric: METRIC = "val_loss"
    mode: Literal["min", "max"] = "min"


class LossConfig(_Strict):
    name: Literal["ce", "focal"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    focal_gamma: float = Field(2.0, ge=0, le=100)
    # "none", "balanced" (inverse class frequency of the training set) or one weight per class.
    class_weights: Literal["none", "balanced"] | list[Annotated[float, Field(ge=0, le=1e6)]] = Field(
        "none", max_length=100_000)
    # Multi-task models (task=trajectory): total = classification x CE + regression x MSE of the standardised
    # target (+ the model's own auxiliary losses, weighted by the model).
    classification_weight: float = Field(1.0, ge=0, le=1e6)
    regression_weight: float = Field(1.0, ge=0, le=1e6)


class EmaConfig(_Strict):
    """An exponential moving average of the weights (timm's ModelEmaV3); when on, validation, selection and
    the exported model use the averaged weights."""

    enabled: bool = False
    decay: float = Field(0.999, gt=0, lt=1)
    # Ramp the decay up over the first steps (timm's warmup), so a short run's average is not its init.
    warmup: bool = True


class CalibrationConfig(_Strict):
    # Fit a softmax temperature on the validation split after training; the model card stores it and the
    # inference server applies it. ECE and reliability diagrams are logged either way.
    temperature: bool = False


class BenchmarkConfig(_Strict):
    """Measure the exported model when the run finishes (shared.benchmark, as `trainyard bench` does) and log
    the figures to the run as ``bench_*`` metrics, so one MLflow run holds training and deployment numbers."""

    enabled: bool = False
    # One sample's forward input (C, H, W for images); None: the model card's input size.
    input_shape: list[Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)]] | None = Field(None, min_length=3, max_length=6)
    batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = Field(default_factory=lambda: [1, 32], min_length=1,
                                                                         max_length=16)
    quantize: bool = True
    iterations: int = Field(50, ge=5, le=10_000)
    throughput_seconds: float = Field(1.0, gt=0, le=60)


class EarlyStoppingConfig(_Strict):
    enabled: bool = False
    metric: METRIC = "val_loss"
    mode: Literal["min", "max"] = "min"
    patience: int = Field(5, ge=1, le=MAX_EPOCHS)
    min_delta: float = Field(0.0, ge=0, le=1e6)


class CheckpointConfig(_Strict):
    every_epoch: bool = True
    # The metric that decides the `best` checkpoint (and the exported model).
    keep_best_metric: METRIC = "val_acc"
    mode: Literal["min", "max"] = "max"
    keep_last: int = Field(2, ge=1, le=1000)


class ExportConfig(_Strict):
    enabled: bool = True
    # Registered model name; None = the experiment name.
    name: NAME | None = None
    # How the inference server batches the published model (written into its card; unset: the server's flags).
    serving: Serving | None = None


class UnfreezeStep(_Strict):
    epoch: int = Field(ge=0, le=MAX_EPOCHS)
    # Number of backbone stages (from the head backwards) trainable from this epoch on; -1 = all.
    stages: int = Field(ge=-1, le=1000)


class CaptionConfig(_Strict):
    """task=captioning: the tokenizer trained on the run's training text, sequence bounds, generation."""
    vocab_size: int = Field(1536, ge=261, le=65536)  # 256 byte tokens + 5 special tokens at least
    max_len: int = Field(384, ge=8, le=4096)
    # Generation when evaluating held-out samples and when served (the model card records these).
    max_new_tokens: int = Field(256, ge=1, le=1024)
    num_beams: int = Field(1, ge=1, le=16)
    length_penalty: float = Field(1.0, ge=0, le=10)
    # Held-out samples whose descriptions are generated at the end (structured accuracy, BLEU, chrF).
    eval_samples: int = Field(300, ge=1, le=100_000)
    # Training images shifted by up to this many pixels (edge padding is white, as the views' background).
    shift: int = Field(4, ge=0, le=64)


class TrainConfig(_Strict):
    experiment: NAME
    run_name: Annotated[str, Field(min_length=1, max_length=250)] | None = None
    # What is learnt (services.train.engine.tasks.TASKS): the data, the loss and the metrics follow from it.
    task: Literal["classification", "trajectory", "captioning"] = "classification"
    model: ModelConfig
    data: DataConfig
    epochs: int = Field(gt=0, le=MAX_EPOCHS)
    batch_size: int = Field(64, gt=0, le=MAX_BATCH)
    eval_batch_size: int | None = Field(None, gt=0, le=MAX_BATCH)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    grad_clip: float | None = Field(None, gt=0, le=1e6)
    # Gradient accumulation: one optimiser step per this many batches (effective batch = batch_size x steps).
    accumulate_steps: int = Field(1, ge=1, le=4096)
    amp: bool = False
    # NHWC memory layout for model and inputs: faster convolutions on GPUs with tensor cores.
    channels_last: bool = False
    ema: EmaConfig = Field(default_factory=EmaConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    deterministic: bool = False
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    # Transfer learning: start with the backbone frozen and unfreeze stages on the given epochs. It needs
    # model.pretrained: a frozen random backbone trains the head on random features, which a run must ask
    # for by name (freeze_random_backbone: true).
    freeze_backbone: bool = False
    freeze_random_backbone: bool = False
    unfreeze: list[UnfreezeStep] = Field(default_factory=list, max_length=1000)
    num_threads: int | None = Field(None, gt=0, le=1024)
    # MLflow's own limits on tag keys and values.
    tags: dict[Annotated[str, Field(min_length=1, max_length=250)], Annotated[str, Field(max_length=5000)]] = Field(
        default_factory=dict, max_length=100)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if isinstance(self.loss.class_weights, list) and self.data.kind == "synthetic" \
                and len(self.loss.class_weights) != self.data.num_classes:
            raise ValueError("loss.class_weights needs one weight per class")
        for task, kind in (("trajectory", "trajectories"), ("captioning", "tinyllava")):
            if (self.task == task) != (self.data.kind == kind):
                raise ValueError(f"task={self.task} cannot train on data.kind={self.data.kind}: {task} models "
                                 f"train on kind={kind}, and only they do")
        if self.unfreeze and not self.freeze_backbone:
            raise ValueError("unfreeze steps need freeze_backbone: true")
        if self.freeze_backbone and not self.model.pretrained and not self.freeze_random_backbone:
            raise ValueError("freeze_backbone: true needs pretrained backbone weights (model.pretrained: "
                             "store:models/<name>[/<version>] or a local weights file): without them the backbone "
                             "is random and freezing it trains the head on random features. Set "
                             "freeze_random_backbone: true if that is what you want")
        if self.freeze_random_backbone and not self.freeze_backbone:
            raise ValueError("freeze_random_backbone needs freeze_backbone: true")
        for where, metric in (("checkpoint.keep_best_metric", self.checkpoint.keep_best_metric),
                              ("early_stopping.metric", self.early_stopping.metric),
                              ("scheduler.metric", self.scheduler.metric)):
            if metric.startswith("test_"):
                raise ValueError(f"{where}={metric}: selection, early stopping and schedules see validation "
                                 "only (the test split is evaluated once, at the end); to select on the test "
                                 "split anyway set data.val_split: test")
        return self

    @property
    def selection_split(self) -> str:
        """The split model selection saw: "val", or "test" when the config chose to select on it."""
        return "test" if self.data.val_split == "test" else "val"

    def default_run_name(self) -> str:
        """``<model>-<data>-<subset>-s<seed>``: what tells runs apart in the MLflow UI."""
        subset = self.data.subset if self.data.subset is not None else "all"
        return f"{self.model.name}-{self.data.kind}-{subset}-s{self.seed}"


def load_train_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


def parse_train_config(data: dict[str, Any], overrides: Iterable[str] = ()) -> TrainConfig:
    return parse_config(TrainConfig, data, overrides)
