"""Typed configuration for one rayrlhf job: sections (`sections.py`: what is trained; `runtime.py`: how it
runs), the job and its cross-section checks (`job.py`), and loading YAML with overrides (`loading.py`)."""

from rayrlhf.config.env import EnvConfig
from rayrlhf.config.job import JobConfig
from rayrlhf.config.loading import ConfigError, load_config, parse_override, to_yaml
from rayrlhf.config.runtime import (
    CheckpointConfig,
    FaultsConfig,
    LoggingConfig,
    RayConfig,
    RoleConfig,
    RolloutConfig,
    ScheduleConfig,
    ServersConfig,
    TrainerConfig,
)
from rayrlhf.config.sections import (
    GROUP_ALGORITHMS,
    OFFLINE_ALGORITHMS,
    ONLINE_ALGORITHMS,
    AlgorithmConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    RewardConfig,
    RewardFunctionConfig,
    Section,
)

__all__ = [
    "GROUP_ALGORITHMS", "OFFLINE_ALGORITHMS", "ONLINE_ALGORITHMS", "AlgorithmConfig", "CheckpointConfig", "ConfigError",
    "DataConfig", "EnvConfig", "FaultsConfig", "JobConfig", "LoggingConfig", "LoraConfig", "ModelConfig", "RayConfig", "RewardConfig",
    "RewardFunctionConfig", "RoleConfig",
    "RolloutConfig", "ScheduleConfig", "Section", "ServersConfig", "TrainerConfig", "load_config", "parse_override",
    "to_yaml",
]
