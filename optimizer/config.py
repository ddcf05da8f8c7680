"""Host sections of config.yaml: one frozen dataclass per optimizer step."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import in_range, require

ENGINES = ("qnnpack", "x86", "fbgemm")
SOURCES = ("cifar10", "synthetic", "folder")
PRUNE_METHODS = ("unstructured", "structured")
IMPORTANCES = ("l1", "l2", "taylor")


@dataclass(frozen=True)
class DataConfig:
    source: str = "cifar10"  # cifar10 | synthetic (the offline stand-in) | folder
    # cifar10: where cifar-10-batches-py lives or is downloaded to; folder: the folder
    # holding train/<class>/ (and optionally val/<class>/)
    root: str = "data"
    download: bool = True
    synthetic_train: int = 10000
    synthetic_test: int = 2000
    seed: int = 0
    batch_size: int = 64
    augment: bool = True  # random crop and horizontal flip while training
    val_fraction: float = 0.2  # folder without val/: the share of each class held out
    workers: int | None = None  # folder: image-reading processes; None = min(4, CPUs)
    max_bad_fraction: float = 0.01  # folder: unreadable images skipped up to this share

    def __post_init__(self) -> None:
        require(self.source in SOURCES, "source",
                f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        require(0.0 < self.val_fraction < 1.0, "val_fraction",
                f"must be between 0 and 1 (exclusive), got {self.val_fraction}")
        require(0.0 <= self.max_bad_fraction < 1.0, "max_bad_fraction",
                f"must be in [0, 1), got {self.max_bad_fraction}")
        if self.workers is not None:
            in_range(self.workers, "workers", 0, 64)
        in_range(self.synthetic_train, "synthetic_train", 10, 1_000_000, " images")
        in_range(self.synthetic_test, "synthetic_test", 10, 1_000_000, " images")
        in_range(self.seed, "seed", 0, 2**32 - 1)
        in_range(self.batch_size, "batch_size", 1, 65_536)


@dataclass(frozen=True)
class TrainConfig:
    # Bring your own model: a "package.module:callable" returning an nn.Module, and
    # optionally its trained state_dict (then `train` checks and adopts it, no training).
    # torchvision's classifiers by name: "torchvision.models:mobilenet_v3_small".
    factory: str = "optimizer.model:SimpleCNN"
    checkpoint: str | None = None
    weights: str | None = None  # torchvision weights to start from: DEFAULT, IMAGENET1K_V1
    freeze_backbone: bool = False  # train only the classifier head (transfer learning)
    input_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    classes: list[str] | None = None  # None: the dataset's own class names
    epochs: int = 10
    lr: float = 0.001
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        require(":" in self.factory, "factory",
                f"must look like package.module:callable, got {self.factory!r}")
        require(len(self.input_shape) == 3 and all(d > 0 for d in self.input_shape),
                "input_shape", f"must be [channels, height, width], got {self.input_shape}")
        in_range(self.epochs, "epochs", 1, 10_000)
        in_range(self.lr, "lr", 1e-9, 10)
        in_range(self.weight_decay, "weight_decay", 0, 1)
        in_range(self.seed, "seed", 0, 2**32 - 1)


@dataclass(frozen=True)
class PruneConfig:
    # unstructured: the smallest weights set to zero (same dense size and speed, smaller
    # after compression); structured: whole channels removed (optimizer/structured.py)
    method: str = "unstructured"
    amount: float = 0.7  # unstructured: fraction of conv and linear weights set to zero
    scope: str = "global"  # unstructured: global: smallest |w| across all layers; layer: per layer
    # structured: MACs per image kept, in (0, 1); target_params_ratio, when set, is the
    # target instead (parameters kept)
    target_macs_ratio: float = 0.5
    target_params_ratio: float | None = None
    importance: str = "l1"  # structured: how channels are ranked: l1 | l2 | taylor
    steps: int = 1  # structured: rounds to the target, each followed by the fine-tune
    ignore: list[str] | None = None  # structured: layers left whole (the classifier head always)
    round_to: int | None = None  # structured: channel counts kept multiples of this
    skip_if_untraceable: bool = False  # structured: a model torch-pruning cannot trace stays
    # unpruned (with a line saying so) instead of stopping the run
    finetune_epochs: int = 2  # fine-tune after pruning (after each structured step); 0 = none
    finetune_lr: float = 0.0005

    def __post_init__(self) -> None:
        require(self.method in PRUNE_METHODS, "method",
                f"must be one of {', '.join(PRUNE_METHODS)}, got {self.method!r}")
        require(0.0 <= self.amount < 1.0, "amount", f"must be in [0, 1), got {self.amount}")
        require(self.scope in ("global", "layer"), "scope",
                f"must be 'global' or 'layer', got {self.scope!r}")
        require(0.0 < self.target_macs_ratio < 1.0, "target_macs_ratio",
                f"must be between 0 and 1 (exclusive), got {self.target_macs_ratio}")
        if self.target_params_ratio is not None:
            require(0.0 < self.target_params_ratio < 1.0, "target_params_ratio",
                    f"must be between 0 and 1 (exclusive) or null, got "
                    f"{self.target_params_ratio}")
        require(self.importance in IMPORTANCES, "importance",
                f"must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        in_range(self.steps, "steps", 1, 100)
        if self.round_to is not None:
            in_range(self.round_to, "round_to", 1, 1024)
        require(self.ignore is None or all(isinstance(n, str) and n for n in self.ignore),
                "ignore", f"must be a list of layer names or null, got {self.ignore!r}")
        in_range(self.finetune_epochs, "finetune_epochs", 0, 10_000)
        in_range(self.finetune_lr, "finetune_lr", 1e-9, 10)


@dataclass(frozen=True)
class QuantizeConfig:
    engine: str = "qnnpack"  # qnnpack (ARM boards) | x86 | fbgemm (Intel boards)
    source: str = "pruned"  # which model to quantize: pruned | baseline
    calibration_images: int = 512
    max_accuracy_drop: float = 1.0  # percentage points against the fp32 baseline

    def __post_init__(self) -> None:
        require(self.engine in ENGINES, "engine",
                f"unknown engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        require(self.source in ("pruned", "baseline"), "source",
                f"must be 'pruned' or 'baseline', got {self.source!r}")
        in_range(self.calibration_images, "calibration_images", 1, 1_000_000, " images")
        in_range(self.max_accuracy_drop, "max_accuracy_drop", 0, 100, " points")


@dataclass(frozen=True)
class ExportConfig:
    method: str = "script"  # script | trace
    freeze: bool = True
    verify: bool = True  # reload in a fresh process and compare with the in-memory model
    logit_tolerance: float = 1e-4  # max |logit difference| the verification accepts
    sample_size: int = 32  # labelled test images (with host logits) shipped in the bundle
    onnx: bool = True  # also export int8 QDQ for ONNX Runtime (quantized_cnn.onnx)
    # also export an int8 XNNPACK program for ExecuTorch (quantized_cnn.pte); None: when the
    # executorch package is installed on this host
    executorch: bool | None = None
    # also ship an fp32 file for ONNX Runtime (fp32_cnn.onnx) and ExecuTorch (fp32_cnn.pte),
    # for the board's race; None: only for an engine whose int8 file is not faster than its
    # fp32 file on this host
    fp32_candidates: bool | None = None

    def __post_init__(self) -> None:
        require(self.method in ("script", "trace"), "method",
                f"must be 'script' or 'trace', got {self.method!r}")
        in_range(self.logit_tolerance, "logit_tolerance", 0, 1000)
        require(1 <= self.sample_size <= 1000, "sample_size",
                f"must be 1-1000, got {self.sample_size}")


@dataclass(frozen=True)
class ReportConfig:
    threads: int = 1  # torch threads while timing
    warmup: int = 50  # iterations run before timing starts, excluded from the figures
    latency_iters: int = 500  # batch-1 forward passes timed per variant
    throughput_batches: int = 20  # batch-64 forward passes timed per variant

    def __post_init__(self) -> None:
        in_range(self.threads, "threads", 1, 256)
        in_range(self.warmup, "warmup", 0, 1_000_000)
        in_range(self.latency_iters, "latency_iters", 10, 10_000_000)
        in_range(self.throughput_batches, "throughput_batches", 1, 1_000_000)


@dataclass(frozen=True)
class OptimizerConfig:
    """What edge-optimize reads: one section per step."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
