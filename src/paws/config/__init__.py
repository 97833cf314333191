"""Configuration: typed, ranged, documented sections (:mod:`paws.config.schema`) read from YAML
files and ``--set`` overrides (:mod:`paws.config.loading`)."""

from paws.config.loading import (
    RECIPES_DIR,
    apply_overrides,
    describe,
    from_dict,
    load_config,
    recipe_path,
    save_config,
    to_dict,
)
from paws.config.schema import (
    MAX_STEPS,
    TIMM_KEYS,
    BaselineConfig,
    Config,
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SupportConfig,
    TightenConfig,
    ViewsConfig,
)

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
    "load_config",
    "from_dict",
    "to_dict",
    "save_config",
    "apply_overrides",
    "describe",
    "recipe_path",
    "RECIPES_DIR",
    "TIMM_KEYS",
]
