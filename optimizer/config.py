"""Host sections of config.yaml: one frozen dataclass per optimizer step."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.config import BOARD_SECTIONS, require
from optimizer.monitor.config import MonitorConfig

ENGINES = ("qnnpack", "x86", "fbgemm")


@dataclass(frozen=True)
class DataConfig:
    source: str = "cifar10"  # cifar10 | synthetic (the offline stand-in)
    root: str = "data"  # where cifar-10-batches-py lives or is downloaded to
    download: bool = True
    synthetic_train: int = 10000
    synthetic_test: int = 2000
    seed: int = 0
    batch_size: int = 64
    augment: bool = True  # random crop (padding 4) and horizontal flip while training

    def __post_init__(self) -> None:
        require(self.source in ("cifar10", "synthetic"), "source",
                f"must be 'cifar10' or 'synthetic', got {self.source!r}")
        require(self.synthetic_train >= 10, "synthetic_train",
                f"must be >= 10, got {self.synthetic_train}")
        require(self.synthetic_test >= 10, "synthetic_test",
                f"must be >= 10, got {self.synthetic_test}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TrainConfig:
    # Bring your own model: a "package.module:callable" returning an nn.Module, and
    # optionally its trained state_dict (then `train` checks and adopts it, no training).
    factory: str = "optimizer.model:SimpleCNN"
    checkpoint: str | None = None
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
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class PruneConfig:
    amount: float = 0.7  # fraction of conv and linear weights set to zero
    scope: str = "global"  # global: smallest |w| across all layers; layer: per layer
    finetune_epochs: int = 2  # masked fine-tune after pruning; 0 = none
    finetune_lr: float = 0.0005

    def __post_init__(self) -> None:
        require(0.0 <= self.amount < 1.0, "amount", f"must be in [0, 1), got {self.amount}")
        require(self.scope in ("global", "layer"), "scope",
                f"must be 'global' or 'layer', got {self.scope!r}")
        require(self.finetune_epochs >= 0, "finetune_epochs",
                f"must be >= 0, got {self.finetune_epochs}")
        require(self.finetune_lr > 0, "finetune_lr", f"must be > 0, got {self.finetune_lr}")


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
        require(self.calibration_images >= 1, "calibration_images",
                f"must be >= 1, got {self.calibration_images}")
        require(self.max_accuracy_drop >= 0, "max_accuracy_drop",
                f"must be >= 0, got {self.max_accuracy_drop}")


@dataclass(frozen=True)
class ExportConfig:
    method: str = "script"  # script | trace
    freeze: bool = True
    verify: bool = True  # reload in a fresh process and compare with the in-memory model
    logit_tolerance: float = 1e-4  # max |logit difference| the verification accepts
    sample_size: int = 32  # labelled test images (with host logits) shipped in the bundle

    def __post_init__(self) -> None:
        require(self.method in ("script", "trace"), "method",
                f"must be 'script' or 'trace', got {self.method!r}")
        require(self.logit_tolerance >= 0, "logit_tolerance",
                f"must be >= 0, got {self.logit_tolerance}")
        require(1 <= self.sample_size <= 1000, "sample_size",
                f"must be 1-1000, got {self.sample_size}")


@dataclass(frozen=True)
class ReportConfig:
    threads: int = 1  # torch threads while timing
    warmup: int = 50  # iterations run before timing starts, excluded from the figures
    latency_iters: int = 500  # batch-1 forward passes timed per variant
    throughput_batches: int = 20  # batch-64 forward passes timed per variant

    def __post_init__(self) -> None:
        require(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        require(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        require(self.latency_iters >= 10, "latency_iters",
                f"must be >= 10, got {self.latency_iters}")
        require(self.throughput_batches >= 1, "throughput_batches",
                f"must be >= 1, got {self.throughput_batches}")


HOST_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "train": TrainConfig,
    "prune": PruneConfig,
    "quantize": QuantizeConfig,
    "export": ExportConfig,
    "report": ReportConfig,
}

MONITOR_SECTIONS: dict[str, type] = {"monitor": MonitorConfig}

# The optimizer checks the board and monitor sections too, so one config.yaml is validated
# in full on the host before it is ever copied to a board.
ALL_SECTIONS: dict[str, type] = {**HOST_SECTIONS, **MONITOR_SECTIONS, **BOARD_SECTIONS}
