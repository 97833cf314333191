"""The config's sections: nested dataclasses with a type, a range and a one-line doc for every
knob, and the checks between fields. The defaults are the Fashion-MNIST CPU recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from paws.config.after import BaselineConfig, DistillConfig, FinetuneConfig, TightenConfig
from paws.config.fields import MAX_BATCH, MAX_EPOCHS, MAX_IMAGES, MAX_SEED, MAX_STEPS, knob as _f
from paws.errors import UserError

__all__ = [
    "MAX_STEPS",
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
    "DistillConfig",
    "TIMM_KEYS",
    "TIMM_RESERVED",
    "ADAMW_DEFAULTS",
    "timm_kwarg_problem",
    "optimizer_defaults",
]


@dataclass
class DataConfig:
    dataset: Literal["fashion_mnist", "cifar10", "cifar100", "imagenet", "folder", "hf"] = _f(
        "fashion_mnist",
        "which dataset: a built-in one, 'folder' for your own images, or 'hf' for a Hugging "
        "Face dataset on disk",
    )
    root: str | None = _f(
        None,
        "dataset root: idx .gz files, CIFAR batches, or ImageNet's "
        "train/ and val/ folders (Fashion-MNIST also looks in the Debian "
        "package's folder and can download); hf: a folder written by save_to_disk, or an "
        "image folder for the imagefolder builder",
    )
    unlabeled: str | None = _f(
        None,
        "folder dataset: folder of unlabelled images (any layout, "
        "searched recursively); default: the labelled folder",
    )
    labeled: str | None = _f(
        None, "folder dataset: labelled images as <class>/<image> (optional with labels_file)"
    )
    labels_file: str | None = _f(
        None,
        "CSV of labelled images with a header path,label (what paws suggest writes, its label "
        "column filled in; more columns allowed), or a Label Studio JSON or CSV export: "
        "folders: paths relative to the CSV's folder or absolute, with or instead of "
        "data.labeled; built-in, imagenet, hf: image names as in split_file (takes "
        "precedence over the other labelled-subset keys)",
    )
    accept_suggested: bool = _f(
        False,
        "labels_file: a row left without a label takes its suggested_label (default: skipped)",
    )
    labels_columns: list[str] | None = _f(
        None,
        "labels_file CSV: its [path, label] columns (default: path and label, or a Label "
        "Studio CSV export's paws_path or image, and choice)",
    )
    test: str | None = _f(None, "folder dataset: optional test images as <class>/<image>")
    labels_per_class: int | None = _f(
        10,
        "labelled subset of a built-in or hf dataset: this many images per class (drawn with "
        "split_seed); label_fraction and split_file take precedence",
        (1, MAX_IMAGES),
    )
    num_labels: int | None = _f(
        None,
        "labelled subset of a built-in or hf dataset: this many images drawn uniformly at "
        "random from the whole training set with split_seed, so classes get uneven counts, as "
        "a user labelling at random would (takes precedence over labels_per_class and "
        "label_fraction)",
        (1, MAX_IMAGES),
    )
    label_fraction: float | None = _f(
        None,
        "labelled subset of a built-in or hf dataset: this fraction of each class (split_file "
        "takes precedence)",
        (0.0, 1.0),
    )
    split_file: str | None = _f(
        None,
        "labelled subset: file with one image name per line (SimCLR/PAWS ImageNet 1%/10% lists, "
        "CIFAR indices; for folders, names relative to data.labeled; for hf, row numbers of "
        "the train split, or file names of an image folder)",
    )
    split_seed: int = _f(0, "seed of the labelled-subset draw", (0, MAX_SEED))
    unlabeled_includes_labeled: bool = _f(
        True,
        "the unlabelled set is the whole training set, labelled images included (paper footnote 1)",
    )
    image_size: int | None = _f(
        None,
        "folder or hf dataset held in memory: decode images to this "
        "square size (default: views.large_size * 8/7)",
        (8, 4096),
    )
    in_memory: bool | Literal["auto"] = _f(
        "auto",
        "decode images once into uint8 memory: true, false, or 'auto' (when they fit "
        "memory_limit_gb); hf datasets are always decoded into memory",
    )
    memory_limit_gb: float = _f(4.0, "largest in-memory dataset for in_memory: auto", (0.0, 1e6))
    workers: int = _f(-1, "data-loader worker processes for on-disk datasets (-1: auto)", (-1, 256))
    disk_views: Literal["auto", "batched", "per_image"] = _f(
        "auto",
        "images on disk: 'batched' (workers decode them to the in-memory size, the step augments "
        "the batch: the views of a folder held in memory), 'per_image' (workers crop each from "
        "the full-resolution file), 'auto' (batched below views.large_size 64)",
    )
    on_bad_image: Literal["error", "skip"] = _f(
        "error", "a corrupt or non-image file: stop with an error, or skip it and report it"
    )
    max_image_pixels: int = _f(
        89_478_485,
        "an image file claiming more pixels (width x height) is a bad image, never decoded "
        "(a decompression bomb); at most Pillow's own limit",
        (1, 178_956_970),
    )
    channels: int | None = _f(None, "1 (grey) or 3 (colour); default: from the dataset", (1, 3))
    mean: list[float] | None = _f(None, "per-channel normalisation mean (default: dataset's)")
    std: list[float] | None = _f(None, "per-channel normalisation std (default: dataset's)")
    image_column: str = _f("image", "hf dataset: the column of images")
    label_column: str = _f("label", "hf dataset: the column of labels (ClassLabel names: classes)")
    train_split: str = _f("train", "hf dataset: the split of the labelled and unlabelled images")
    test_split: str | None = _f(
        None, "hf dataset: the split of test images (default: 'test', if any)"
    )
    unlabeled_split: str | None = _f(None, "hf dataset: more unlabelled images (labels ignored)")


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
    classes: int | None = _f(
        None,
        "C: classes per support batch, over all processes (default: every labelled class, "
        "at most 4 x optim.batch_size / images_per_class of them)",
        (1, 1_000_000),
    )
    images_per_class: int = _f(
        5,
        "k: images per class per step, over all processes (a class with fewer labelled "
        "images repeats them, each augmented anew)",
        (1, 1_000_000),
    )
    views: int = _f(2, "augmented views of each support image (Appendix C uses 2)", (1, 8))
    label_smoothing: float = _f(0.1, "label smoothing of support labels", (0.0, 0.999))
    unique_classes: bool = _f(False, "split support classes (not images) across processes")


@dataclass
class ModelConfig:
    encoder: str = _f(
        "cnn_small",
        "encoder: cnn_small, resnet18, resnet34, resnet50, wide_resnet28_2, or timm:<name>, any "
        "timm model (pip install 'paws-ssl[timm]'; tested families: README, timm backbones)",
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
    patch_size: int | None = _f(
        None, "timm ViT patch size (default: the model's); crop sides must be multiples", (1, 1024)
    )
    img_size: int | None = _f(
        None, "timm ViT image side of the position-embedding grid (default: the model's)", (8, 4096)
    )
    proj_hidden: int = _f(256, "projection head hidden size", (1, 65536))
    proj_out: int = _f(256, "projection head output size", (1, 65536))
    proj_layers: int = _f(3, "projection head linear layers", (1, 8))
    pred_head: bool = _f(False, "2-layer prediction head on the anchor side (Table 5)")
    pred_hidden: int = _f(512, "prediction head hidden size", (1, 65536))
    timm_kwargs: dict[str, Any] = _f(
        {},
        "timm encoders: more keyword arguments of timm.create_model, plain values (e.g. "
        "{drop_path_rate: 0.1}); --set model.timm_kwargs.drop_path_rate=0.1 sets one",
    )
    weights: str | None = _f(
        None, "initialise the encoder from a torchvision/timm state dict (.pt/.pth/.safetensors)"
    )

    def validate(self) -> None:
        """One-line errors for keys that do not apply to the encoder."""
        timm = self.encoder.startswith("timm:")
        for key, hint in _BUILT_IN_KEYS.items():
            if timm and getattr(self, key):
                raise UserError(f"model.{key} applies to the built-in encoders; {hint}")
        for key in TIMM_KEYS:
            if not timm and getattr(self, key) is not None:
                raise UserError(f"model.{key} applies to timm encoders only (timm:<name>)")
        if self.timm_kwargs and not timm:
            raise UserError("model.timm_kwargs applies to timm encoders only (timm:<name>)")
        for key, value in self.timm_kwargs.items():
            problem = timm_kwarg_problem(key, value)
            if problem:
                raise UserError(f"model.timm_kwargs.{key}: {problem}")


TIMM_KEYS = ("patch_size", "img_size")  # model.* keys passed to timm.create_model as they are
# timm.create_model arguments paws sets itself, with what to do instead of model.timm_kwargs.
TIMM_RESERVED = {
    "pretrained": "weights never come from the hub: set model.weights to a local file",
    "pretrained_cfg": "weights never come from the hub: set model.weights to a local file",
    "pretrained_cfg_overlay": "weights never come from the hub: set model.weights",
    "checkpoint_path": "set model.weights to the file",
    "num_classes": "paws puts its own heads on the trunk's pooled features",
    "in_chans": "the images' channels set it (data.grayscale)",
    "features_only": "paws needs the pooled features",
    **{key: f"set model.{key}" for key in TIMM_KEYS},
}
_PLAIN = (int, float, str, bool, type(None))


def timm_kwarg_problem(key: object, value: object) -> str | None:
    """What is wrong with one ``model.timm_kwargs`` entry (None: nothing): a keyword paws sets
    itself, a name that is no keyword, or a value that is not plain (a number, a word, a
    switch, null, or a list of them), which a run's record could not hold."""
    if not isinstance(key, str) or not key.isidentifier():
        return f"{key!r} is not a keyword argument name"
    if key in TIMM_RESERVED:
        return f"paws sets it itself; {TIMM_RESERVED[key]}"
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, _PLAIN) for v in items):
        return f"must be a number, word, switch, null or a list of them, got {value!r:.60}"
    return None


_BUILT_IN_KEYS = {
    "width": "choose the timm model of the size you want (e.g. timm:vit_small_patch16_224)",
    "small_images": "for a timm ViT on small images set model.patch_size and model.img_size",
}


@dataclass
class LossConfig:
    tau: float = _f(
        0.1,
        "cosine-similarity temperature of soft nearest neighbours (and of NT-Xent with "
        "objective simclr)",
        (1e-4, 10.0),
    )
    sharpen: float = _f(0.25, "target sharpening temperature T", (1e-3, 1.0))
    me_max: bool = _f(True, "mean-entropy maximisation regulariser")
    me_max_prior: Literal["uniform", "labeled", "estimated"] | list[float] = _f(
        "uniform",
        "the class distribution ME-MAX pushes the mean prediction towards: uniform (the "
        "paper's ME-MAX), labeled (the labelled images' class frequencies), estimated (from "
        "the predictions during training), or one number per class (frequencies)",
    )
    me_max_prior_momentum: float = _f(
        0.99,
        "estimated prior: running average of the mean prediction, this much of the old "
        "estimate kept each step",
        (0.0, 0.99999),
    )
    ropaws: bool = _f(
        False,
        "RoPAWS (Mo et al. 2023): targets from the supports and the other unlabelled images, "
        "images far from every labelled class down-weighted; for unlabelled images of classes "
        "nobody labelled",
    )
    ropaws_prior_tau: float = _f(
        0.1,
        "RoPAWS in-domain prior temperature, exp((max similarity to a support - 1) / it) "
        "(0.1 in RoPAWS's CIFAR-10 config, 3.0 for ImageNet)",
        (1e-3, 100.0),
    )
    ropaws_prior_pow: float = _f(
        1.0, "RoPAWS: an image's loss is weighted by its in-domain mass to this power", (0.0, 10.0)
    )
    ropaws_label_ratio: float = _f(
        5.0,
        "RoPAWS: weight of the supports, as a whole, relative to the unlabelled batch in the "
        "targets",
        (1e-3, 1e3),
    )
    objective: Literal["paws", "simclr"] = _f(
        "paws",
        "what pre-training minimises: paws (eq. 4, with the labelled supports) or simclr "
        "(no labels: SimCLR's NT-Xent between the two large views, a label-free embedding "
        "for paws suggest's first labels; chosen by itself when no image is labelled)",
    )


# optim.* values optim.name: adamw takes where the config leaves them unset: DINO's and MSN's
# ViT recipes (Caron et al. 2021, Assran et al. 2022): base rate 5e-4 for a batch of 256,
# warm-up from a tenth of it, cosine to 1e-6, weight decay 0.04 (their starting value).
ADAMW_DEFAULTS = {"ref_lr": 5e-4, "start_lr": 5e-5, "final_lr": 1e-6, "weight_decay": 0.04}


@dataclass
class OptimConfig:
    name: Literal["lars", "adamw"] = _f(
        "lars",
        "optimiser: lars (the paper's: classical momentum, LARS trust ratio) or adamw "
        "(for vision transformers; the keys a config leaves unset take "
        + ", ".join(f"{k} {v:g}" for k, v in ADAMW_DEFAULTS.items())
        + "); biases and norm parameters get no weight decay with either",
    )
    batch_size: int = _f(
        128, "unlabelled images per step, over all processes (global batch)", (1, MAX_BATCH)
    )
    epochs: float = _f(1.774, "passes over the unlabelled set", (0.0, MAX_EPOCHS))
    steps: int | None = _f(None, "number of steps (overrides epochs and min_steps)", (1, MAX_STEPS))
    min_steps: int | None = _f(
        830,
        "a run of optim.epochs shorter than this is lengthened to it, warm-up keeping its "
        "share, so a small folder trains as long as the default run (null: never)",
        (1, MAX_STEPS),
    )
    warmup_epochs: float = _f(0.25, "linear warm-up length in epochs", (0.0, MAX_EPOCHS))
    start_lr: float = _f(0.56, "learning rate at step 0", (0.0, None))
    ref_lr: float = _f(
        2.26,
        "learning rate at the end of warm-up, for the global batch_size: the same on any "
        "number of processes; if you change batch_size, scale it about with the square root "
        "of the change, as the paper does (6.4 at 4096, 1.2 at 256)",
        (0.0, None),
    )
    final_lr: float = _f(0.0226, "learning rate at the last step (cosine decay)", (0.0, None))
    momentum: float = _f(0.9, "classical momentum (Appendix A, eq. 2); adamw: beta1", (0.0, 0.9999))
    beta2: float = _f(0.999, "adamw: second-moment decay beta2", (0.0, 0.99999))
    weight_decay: float = _f(1e-5, "weight decay (not on biases and norm parameters)", (0.0, 1.0))
    lars: bool = _f(
        True, "name lars: LARS trust-ratio adaptation (off: plain classical-momentum SGD)"
    )
    trust_coefficient: float = _f(0.001, "LARS trust coefficient eta", (1e-6, 1.0))


def optimizer_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """A config's nested values with :data:`ADAMW_DEFAULTS` filled in where ``optim.name`` is
    adamw and the optim section leaves them out (LARS's defaults would diverge with AdamW)."""
    optim = values.get("optim") if isinstance(values, dict) else None
    if not isinstance(optim, dict) or optim.get("name") != "adamw":
        return values
    return {**values, "optim": {**ADAMW_DEFAULTS, **optim}}


@dataclass
class RunConfig:
    seed: int = _f(0, "seed of everything: initialisation, batches, augmentations", (0, MAX_SEED))
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "compute device")
    amp: Literal["auto", "off", "bf16", "fp16"] = _f(
        "auto", "mixed precision on GPU ('auto': bf16 where supported); the loss is fp32"
    )
    channels_last: bool | None = _f(None, "channels-last memory format (default: on GPU)")
    compile: bool = _f(False, "torch.compile the encoder (GPU)")
    sync_bn: bool = _f(True, "global batch norm across processes, as in the paper")
    deterministic: bool = _f(False, "deterministic algorithms (bit-exact resume on CPU)")
    threads: int = _f(0, "CPU threads (0: all cores)", (0, 1024))
    log_every: int = _f(25, "steps between metric rows in metrics.csv", (1, MAX_STEPS))
    checkpoint_every: int = _f(500, "steps between checkpoints (last.pt)", (1, MAX_STEPS))
    export: bool = _f(
        True,
        "at the end, export the model the run means to RUN_DIR/export (paws.load(RUN_DIR) "
        "then opens in a fraction of a second)",
    )
    eval_every: int = _f(
        0, "steps between PAWS-NN evaluations during training (0: at the end)", (0, MAX_STEPS)
    )
    monitor_every: int = _f(
        100, "steps between monitor-only metrics (Fig. 4b), 0: never", (0, MAX_STEPS)
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
    batch_size: int = _f(512, "images per forward pass", (1, MAX_BATCH))
    chunk_size: int = _f(8192, "supports per similarity chunk (bounds memory)", (1, 2**31 - 1))
    unknown_score: Literal["diffusion", "soft", "nearest"] = _f(
        "diffusion",
        "known score of an image: diffusion (label propagation from the labelled images "
        "through a nearest-neighbour graph of the unlabelled ones), soft (tau x log of the "
        "summed exp(cosine / tau) over the labelled images) or nearest (the largest cosine "
        "similarity to one); see benchmarks/open_set.py",
    )
    unknown_neighbours: int = _f(
        10, "diffusion known score: nearest neighbours in its graph and of a new image", (1, 1000)
    )
    unknown_nodes: int = _f(
        20000,
        "diffusion known score: at most this many unlabelled images in its graph (bounds "
        "the time and memory of building it)",
        (1, 10_000_000),
    )
    unknown_features: Literal["trunk", "head"] = _f(
        "trunk",
        "embedding of the known score: the encoder's output (trunk: kept its AUROC through "
        "tightening, see benchmarks/uncurated.py) or the head PAWS-NN classifies in",
    )
    choice_folds: int = _f(
        5,
        "paws train chooses the model the run means (pre-trained, tightened, student) by this "
        "many folds of cross-validation over the labelled images; 0 or 1: keep the default",
        (0, 1000),
    )
    unknown_quantile: float = _f(
        0.05,
        "an image is unknown when its known score is below this quantile of the labelled "
        "images' own (leave-one-out) scores: about this share of known images is flagged too",
        (0.0, 1.0),
    )


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
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self) -> Config:
        """Cross-field checks; returns self."""
        d, v = self.data, self.views
        self.model.validate()
        if d.dataset == "folder" and not d.labeled and not d.labels_file and not d.unlabeled:
            raise UserError(
                "data.dataset is 'folder' but data.labeled is not set: point it to "
                "a folder of <class>/<image> files, or set data.labels_file (or data.unlabeled "
                "alone, for a label-free run)"
            )
        if d.labels_columns is not None and len(d.labels_columns) != 2:
            raise UserError(
                f"data.labels_columns needs two column names [path, label], got {d.labels_columns}"
            )
        if d.dataset == "hf" and not d.root:
            raise UserError("data.dataset is 'hf': set data.root to a saved dataset or images")
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
        if d.std is not None and any(v <= 0 for v in d.std):
            raise UserError(
                f"data.std must be > 0 for every channel (it divides the pixels), got {d.std}"
            )
        if self.optim.steps is None and self.optim.epochs <= 0:
            raise UserError(
                "optim.epochs is 0: the run would take no step; give optim.epochs > 0 or "
                "optim.steps"
            )
        prior = self.loss.me_max_prior
        if isinstance(prior, list) and (not prior or min(prior) < 0 or sum(prior) <= 0):
            raise UserError(
                "loss.me_max_prior as numbers needs one non-negative frequency per class, not "
                f"all zero, got {prior}"
            )
        if not self.finetune.lrs or not self.finetune.epochs:
            raise UserError("finetune.lrs and finetune.epochs must not be empty")
        if any(lr <= 0 for lr in self.finetune.lrs):
            raise UserError(f"finetune.lrs must all be > 0, got {self.finetune.lrs}")
        if any(not 1 <= e <= MAX_EPOCHS for e in self.finetune.epochs):
            raise UserError(
                f"finetune.epochs must all be in [1, {MAX_EPOCHS:g}], got {self.finetune.epochs}"
            )
        sweep = len(self.finetune.lrs) * len(self.finetune.epochs)
        if self.finetune.val_fraction == 0 and sweep > 1:
            raise UserError(
                f"finetune.val_fraction is 0 but the sweep has {sweep} settings to choose from; "
                "hold out a validation fraction or give one lr and one epoch count"
            )
        return self
