"""Configuration: typed, ranged, documented sections (:mod:`paws.config.schema`) read from YAML
files and ``--set`` overrides (:mod:`paws.config.loading`)."""

from paws.config.loading import (
    DATA_PATHS as DATA_PATHS,
    RECIPES_DIR as RECIPES_DIR,
    absolute_data_paths as absolute_data_paths,
    apply_overrides as apply_overrides,
    describe as describe,
    from_dict as from_dict,
    load_config as load_config,
    read_yaml as read_yaml,
    recipe_path as recipe_path,
    relative_data_paths as relative_data_paths,
    save_config as save_config,
    to_dict as to_dict,
    with_absolute_paths as with_absolute_paths,
)
from paws.config.schema import (
    ADAMW_DEFAULTS as ADAMW_DEFAULTS,
    MAX_STEPS as MAX_STEPS,
    TIMM_KEYS as TIMM_KEYS,
    TIMM_RESERVED as TIMM_RESERVED,
    BaselineConfig as BaselineConfig,
    Config as Config,
    DataConfig as DataConfig,
    DistillConfig as DistillConfig,
    EvalConfig as EvalConfig,
    FinetuneConfig as FinetuneConfig,
    LossConfig as LossConfig,
    ModelConfig as ModelConfig,
    OptimConfig as OptimConfig,
    RunConfig as RunConfig,
    SupportConfig as SupportConfig,
    TightenConfig as TightenConfig,
    ViewsConfig as ViewsConfig,
    timm_kwarg_problem as timm_kwarg_problem,
)
