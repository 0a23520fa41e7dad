"""Multi-turn environments and tools: user code run isolated from the rollout workers.

- `protocol`: StepResult, EnvFailure and the checks on what user code returns;
- `host` / `server`: one environment host process (parent and child sides);
- `pool`: host processes beside a rollout worker (`EnvPool`), `make_env_client`;
- `actors`: the same hosts inside Ray actors env-0..env-N-1 (env.num_workers > 0; imports Ray);
- `check`: `check_env`, run before Ray starts;
- `tools`, `schema`, `parsers`, `runner`, `sandbox`: the built-in tool environment and the python tool.

This package is imported by the host processes: nothing here may import Ray, torch or pydantic at import time.
"""

from rayrlhf.envs.check import check_env
from rayrlhf.envs.host import EnvHost
from rayrlhf.envs.pool import EnvClient, EnvPool, make_env_client
from rayrlhf.envs.protocol import FAILURE_KINDS, EnvFailure, HostSpec, StepResult

__all__ = ["FAILURE_KINDS", "EnvClient", "EnvFailure", "EnvHost", "EnvPool", "HostSpec", "StepResult", "check_env",
           "make_env_client"]
