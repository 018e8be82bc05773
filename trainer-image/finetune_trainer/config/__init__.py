"""The configuration language (the seed's YAML): schema, rules, loading. Imports nothing heavy."""

from .issues import ConfigError, ConfigIssue
from .loader import LoadedConfig, apply_overrides, dump_config, load_config, parse_overrides, read_document, validate_data
from .schema import FineTuneConfig

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "FineTuneConfig",
    "LoadedConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_overrides",
    "read_document",
    "validate_data",
]
