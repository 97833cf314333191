"""Configuration: nested dataclasses with a type, a range and a one-line doc for every knob.

YAML files and ``--set section.key=value`` overrides are read into :class:`Config`; an unknown
or misspelt key, a value of the wrong type or out of range is a :class:`UserError` that names
the key (and suggests the closest valid one). The defaults are the Fashion-MNIST CPU recipe;
``configs/`` holds the paper's recipes. The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from paws.errors import UserError

__all__ = [
    "Config",
    "DataConfig",
    "ViewsConfig",
    "SupportConfig",
    "ModelConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "EvalConfig",
    "BaselineConfig",
    "FinetuneConfig",
    "TightenConfig",
    "load_config",
    "from_dict",
    "to_dict",
    "save_config",
    "apply_overrides",
    "describe",
    "recipe_path",
    "RECIPES_DIR",
]

RECIPES_DIR = Path(__file__).parent / "configs"


def _f(default: Any, doc: str, range: tuple[float | None, float | None] | None = None) -> Any:
    """A dataclass field with a doc string and an optional inclusive (lo, hi) range."""
    meta = {"doc": doc, "range": range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "imagenet", "folder"] = _f(
        "fashion_mnist", "which dataset: a built-in one or 'folder' for your own images"
    )
    root: str | None = _f(
        None,
        "dataset root: idx .gz files, CIFAR batches, or ImageNet's "
        "train/ and val/ folders (Fashion-MNIST also looks in the Debian "
        "package's folder and can download)",
    )
    unlabeled: str | None = _f(
        None,
        "folder dataset: folder of unlabelled images (any layout, "
        "searched recursively); default: the labelled folder",
    )
    labeled: str | None = _f(None, "folder dataset: labelled images as <class>/<image>")
    test: str | None = _f(None, "folder dataset: optional test images as <class>/<image>")
    labels_per_class: int | None = _f(
        10,
        "labelled subset of a built-in dataset: this many images per class (drawn with "
        "split_seed); label_fraction and split_file take precedence",
        (1, None),
    )
    label_fraction: float | None = _f(
        None,
        "labelled subset of a built-in dataset: this fraction of each class (split_file takes "
        "precedence)",
        (0.0, 1.0),
    )
    split_file: str | None = _f(
        None,
        "labelled subset: file with one image name per line (SimCLR/PAWS ImageNet 1%/10% lists, "
        "CIFAR indices; for folders, names relative to data.labeled)",
    )
    split_seed: int = _f(0, "seed of the labelled-subset draw", (0, None))
    unlabeled_includes_labeled: bool = _f(
        True,
        "the unlabelled set is the whole training set, labelled images included (paper footnote 1)",
    )
    image_size: int | None = _f(
        None,
        "folder dataset held in memory: decode images to this "
        "square size (default: views.large_size * 8/7)",
        (8, 4096),
    )
    in_memory: bool | Literal["auto"] = _f(
        "auto",
        "decode images once into uint8 memory: true, false, or 'auto' (when they fit "
        "memory_limit_gb)",
    )
    memory_limit_gb: float = _f(4.0, "largest in-memory dataset for in_memory: auto", (0.0, None))
    workers: int = _f(-1, "data-loader worker processes for on-disk datasets (-1: auto)", (-1, 256))
    on_bad_image: Literal["error", "skip"] = _f(
        "error", "a corrupt or non-image file: stop with an error, or skip it and report it"
    )
    channels: int | None = _f(None, "1 (grey) or 3 (colour); default: from the dataset", (1, 3))
    mean: list[float] | None = _f(None, "per-channel normalisation mean (default: dataset's)")
    std: list[float] | None = _f(None, "per-channel normalisation std (default: dataset's)")


@dataclass
class ViewsConfig:
    large_size: int = _f(20, "side of the 2 large crops (and of support views)", (4, 4096))
    large_scale: list[float] = _f([0.75, 1.0], "RandomResizedCrop area range of large crops")
    small_crops: int = _f(6, "number of small crops per unlabelled image (multi-crop)", (0, 64))
    small_size: int = _f(12, "side of small crops", (4, 4096))
    small_scale: list[float] = _f([0.3, 0.75], "RandomResizedCrop area range of small crops")
    ratio: list[float] = _f([0.75, 1.3333333], "RandomResizedCrop aspect-ratio range")
    flip: bool = _f(True, "random horizontal flip")
    color_strength: float = _f(
        0.5,
        "colour-distortion strength s (SimCLR); grey images get brightness and contrast only",
        (0.0, 4.0),
    )
    color_prob: float = _f(0.8, "probability of colour jitter", (0.0, 1.0))
    gray_prob: float = _f(0.2, "probability of converting a colour view to grey", (0.0, 1.0))
    blur_prob: float = _f(0.0, "probability of Gaussian blur (ImageNet recipes: 0.5)", (0.0, 1.0))
    eval_crop: float = _f(
        1.0,
        "evaluation: resize to large_size / eval_crop, centre-crop large_size (ImageNet: 0.875)",
        (0.1, 1.0),
    )


@dataclass
class SupportConfig:
    classes: int = _f(10, "C: classes per support batch, over all processes", (1, None))
    images_per_class: int = _f(
        5, "k: distinct images per class per step, over all processes", (1, None)
    )
    views: int = _f(2, "augmented views of each support image (Appendix C uses 2)", (1, 8))
    label_smoothing: float = _f(0.1, "label smoothing of support labels", (0.0, 0.999))
    unique_classes: bool = _f(False, "split support classes (not images) across processes")


@dataclass
class ModelConfig:
    encoder: str = _f(
        "cnn_small", "encoder: cnn_small, resnet18, resnet34, resnet50, wide_resnet28_2"
    )
    width: int = _f(
        0,
        "encoder width: cnn_small base channels, ResNet width multiplier, "
        "WideResNet widen factor (0: the architecture's default: 32, 1, 2)",
        (0, 1024),
    )
    small_images: bool | None = _f(
        None, "small-image stem (3x3 conv, no max-pool); default: when views.large_size < 64"
    )
    proj_hidden: int = _f(256, "projection head hidden size", (1, None))
    proj_out: int = _f(256, "projection head output size", (1, None))
    proj_layers: int = _f(3, "projection head linear layers", (1, 8))
    pred_head: bool = _f(False, "2-layer prediction head on the anchor side (Table 5)")
    pred_hidden: int = _f(512, "prediction head hidden size", (1, None))
    weights: str | None = _f(
        None, "initialise the encoder from a torchvision/timm state dict (.pt/.pth/.safetensors)"
    )


@dataclass
class LossConfig:
    tau: float = _f(0.1, "cosine-similarity temperature of soft nearest neighbours", (1e-4, 10.0))
    sharpen: float = _f(0.25, "target sharpening temperature T", (1e-3, 1.0))
    me_max: bool = _f(True, "mean-entropy maximisation regulariser")


@dataclass
class OptimConfig:
    batch_size: int = _f(
        128, "unlabelled images per step, over all processes (global batch)", (1, None)
    )
    epochs: float = _f(1.774, "passes over the unlabelled set", (0.0, None))
    steps: int | None = _f(None, "number of steps (overrides epochs)", (1, None))
    warmup_epochs: float = _f(0.25, "linear warm-up length in epochs", (0.0, None))
    start_lr: float = _f(0.56, "learning rate at step 0", (0.0, None))
    ref_lr: float = _f(
        2.26,
        "learning rate at the end of warm-up, for the global batch_size: the same on any "
        "number of processes; if you change batch_size, scale it about with the square root "
        "of the change, as the paper does (6.4 at 4096, 1.2 at 256)",
        (0.0, None),
    )
    final_lr: float = _f(0.0226, "learning rate at the last step (cosine decay)", (0.0, None))
    momentum: float = _f(0.9, "classical momentum (Appendix A, eq. 2)", (0.0, 0.9999))
    weight_decay: float = _f(1e-5, "weight decay (not on biases and norm parameters)", (0.0, 1.0))
    lars: bool = _f(True, "LARS trust-ratio adaptation (off: plain classical-momentum SGD)")
    trust_coefficient: float = _f(0.001, "LARS trust coefficient eta", (1e-6, 1.0))


@dataclass
class RunConfig:
    seed: int = _f(0, "seed of everything: initialisation, batches, augmentations", (0, None))
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "compute device")
    amp: Literal["auto", "off", "bf16", "fp16"] = _f(
        "auto", "mixed precision on GPU ('auto': bf16 where supported); the loss is fp32"
    )
    channels_last: bool | None = _f(None, "channels-last memory format (default: on GPU)")
    compile: bool = _f(False, "torch.compile the encoder (GPU)")
    sync_bn: bool = _f(True, "global batch norm across processes, as in the paper")
    deterministic: bool = _f(False, "deterministic algorithms (bit-exact resume on CPU)")
    threads: int = _f(0, "CPU threads (0: all cores)", (0, 1024))
    log_every: int = _f(25, "steps between metric rows in metrics.csv", (1, None))
    checkpoint_every: int = _f(500, "steps between checkpoints (last.pt)", (1, None))
    eval_every: int = _f(
        0, "steps between PAWS-NN evaluations during training (0: at the end)", (0, None)
    )
    monitor_every: int = _f(
        100, "steps between monitor-only metrics (Fig. 4b), 0: never", (0, None)
    )
    tensorboard: bool = _f(False, "also log to TensorBoard (the same as adding it to trackers)")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = _f(
        [],
        "experiment trackers that also get the config, metrics, results and files "
        "(each an extra: pip install 'paws-ssl[mlflow]'); a resume may add one",
    )
    experiment: str = _f("paws", "MLflow experiment and W&B project of tracked runs")


@dataclass
class EvalConfig:
    features: Literal["head", "trunk"] = _f(
        "head", "PAWS-NN embeddings: the head output anchors are classified in, or the trunk"
    )
    tau: float = _f(0.1, "soft nearest-neighbour temperature", (1e-4, 10.0))
    batch_size: int = _f(512, "images per forward pass", (1, None))
    chunk_size: int = _f(8192, "supports per similarity chunk (bounds memory)", (1, None))


@dataclass
class BaselineConfig:
    epochs: float | None = _f(
        None,
        "supervised-only baseline length in epochs over the "
        "labelled set (default: the same number of steps as PAWS)",
        (0.0, None),
    )
    batch_size: int = _f(128, "labelled images per step", (1, None))
    lr: float = _f(
        0.1, "learning rate (SGD, classical Nesterov momentum, cosine decay)", (0.0, None)
    )
    weight_decay: float = _f(5e-4, "weight decay", (0.0, 1.0))
    time_limit: float | None = _f(
        None, "stop after this many seconds (same wall-clock budget)", (0.0, None)
    )


@dataclass
class FinetuneConfig:
    lrs: list[float] = _f(
        [0.01, 0.02, 0.05, 0.1, 0.2], "learning rates swept (Appendix A; each > 0)"
    )
    epochs: list[int] = _f([30, 50], "epoch counts swept (Appendix A; each >= 1)")
    batch_size: int = _f(
        256, "labelled images per step (paper: 1024; at most the labelled set)", (2, None)
    )
    val_fraction: float = _f(
        0.2,
        "fraction of each labelled class held out to choose the setting (never the test set); "
        "0 only with a single setting",
        (0.0, 0.9),
    )


@dataclass
class TightenConfig:
    after_training: bool = _f(
        True,
        "paws train ends by tightening (Appendix C's CIFAR-10 protocol) and reports PAWS-NN "
        "before and after; the tightened model is tighten.pt",
    )
    steps: int = _f(180, "SuNCEt fine-tuning steps (Appendix C)", (1, None))
    classes: int = _f(10, "classes per batch (at most the labelled classes)", (2, None))
    images_per_class: int = _f(
        64, "distinct images per class per batch (at most the smallest class)", (1, None)
    )
    lr: float = _f(0.1, "learning rate at step 0, cosine decay to 0", (0.0, None))
    momentum: float = _f(0.9, "classical momentum (no weight decay)", (0.0, 0.9999))
    lars: bool = _f(
        True,
        "LARS adaptation of the weights (trust coefficient optim.trust_coefficient), as the "
        "official code; off: plain momentum SGD, which needs a far smaller lr",
    )
    tau: float = _f(0.1, "SuNCEt temperature", (1e-4, 10.0))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    support: SupportConfig = field(default_factory=SupportConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tighten: TightenConfig = field(default_factory=TightenConfig)

    def validate(self) -> Config:
        """Cross-field checks; returns self."""
        d, v = self.data, self.views
        if d.dataset == "folder" and not d.labeled:
            raise UserError(
                "data.dataset is 'folder' but data.labeled is not set: point it to "
                "a folder of <class>/<image> files"
            )
        for name in ("large_scale", "small_scale", "ratio"):
            lo_hi = getattr(v, name)
            if (
                len(lo_hi) != 2
                or not 0 < lo_hi[0] <= lo_hi[1]
                or (name != "ratio" and lo_hi[1] > 1)
            ):
                raise UserError(
                    f"views.{name} must be [low, high] with 0 < low <= high"
                    + ("" if name == "ratio" else " <= 1")
                    + f", got {lo_hi}"
                )
        for name in ("mean", "std"):
            val = getattr(d, name)
            if val is not None and len(val) not in (1, 3):
                raise UserError(f"data.{name} needs 1 or 3 values, got {len(val)}")
        if not self.finetune.lrs or not self.finetune.epochs:
            raise UserError("finetune.lrs and finetune.epochs must not be empty")
        if any(lr <= 0 for lr in self.finetune.lrs):
            raise UserError(f"finetune.lrs must all be > 0, got {self.finetune.lrs}")
        if any(e < 1 for e in self.finetune.epochs):
            raise UserError(f"finetune.epochs must all be >= 1, got {self.finetune.epochs}")
        sweep = len(self.finetune.lrs) * len(self.finetune.epochs)
        if self.finetune.val_fraction == 0 and sweep > 1:
            raise UserError(
                f"finetune.val_fraction is 0 but the sweep has {sweep} settings to choose from; "
                "hold out a validation fraction or give one lr and one epoch count"
            )
        return self


# --------------------------------------------------------------------------------------------
# Reading, checking and writing.


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 scalars: only true/false are booleans, so choices such as
    ``run.amp: off`` and ``data.in_memory: no`` stay strings, and ``1e-6`` is a float (PyYAML's
    YAML 1.1 rules read it as a string)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


# Switches also take the YAML 1.1 words (which the loader above keeps as strings).
_YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert: int to float, tuple to list) ``value`` against ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = UserError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except UserError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(x, args[0], f"{key}[{i}]") for i, x in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YAML11_BOOLS:
            return _YAML11_BOOLS[value.lower()]
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _check_range(value: Any, rng: tuple | None, key: str) -> None:
    if rng is None or value is None or isinstance(value, (list, str, bool)):
        return
    lo, hi = rng
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise UserError(f"{key} must be {span}, got {value}")


def _unknown(key: str, valid: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return UserError(f"unknown config key '{where}{key.split('.')[-1]}'{hint}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"config section '{where.rstrip('.') or 'top level'}' must be a mapping")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(str(key), list(fields), where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}{key}")
            _check_range(kwargs[key], fields[key].metadata.get("range"), f"{where}{key}")
    return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict (missing keys take defaults)."""
    return _build(Config, values or {}, "").validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a nested dict of plain YAML types."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_path(name_or_path: str) -> Path:
    """Resolve a config argument: a YAML path, or the name of a packaged recipe."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise UserError(f"config file not found: {name_or_path} (packaged recipes: {', '.join(names)})")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config sections")
    return data


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
    out = dict(values)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        out = _merge(out, nested)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (file or recipe name; None: defaults) and apply ``--set`` overrides.

    Args:
        path: YAML file or packaged recipe name; None for the Fashion-MNIST defaults.
        overrides: ``section.key=value`` strings.

    Returns:
        A validated :class:`Config`.
    """
    values: dict[str, Any] = _read_yaml(recipe_path(str(path))) if path else {}
    return from_dict(apply_overrides(values, list(overrides or [])))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe() -> str:
    """Every config key with its type, default and doc, for ``paws config --help``."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = _hints(Config)[section.name]
        lines.append(f"{section.name}:")
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(
                f"  {f.name} ({_type_name(hints[f.name])}, default {default!r}): "
                f"{f.metadata.get('doc', '')}"
            )
    return "\n".join(lines)
