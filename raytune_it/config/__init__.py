"""Job configuration: schema, loading (presets, YAML, overrides) and path checks."""

from raytune_it.config.loading import load_config, load_run_config, preset_names, save_config
from raytune_it.config.schema import JobConfig

__all__ = ["JobConfig", "load_config", "load_run_config", "preset_names", "save_config"]
