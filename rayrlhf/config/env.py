"""Config section of multi-turn environments (`env.*`): which class or tool list, where it runs, and the
limits that keep user code from taking a rollout worker down (rayrlhf/envs/)."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from rayrlhf.config.sections import Section

TOOL_ENV_CLASS = "rayrlhf.envs.tools:ToolEnv"
RAY_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources")


class EnvConfig(Section):
    # `class` is a Python keyword: the field is `class_`, read and written (to_yaml) as `class`.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    class_: str | None = Field(
        None, alias="class", description="Environment class, 'path/to/file.py:ClassName' or 'package.module:ClassName'; "
        "null: single-turn (no environment) unless env.tools is set."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the environment's constructor.")
    max_turns: int = Field(8, ge=1, description="Most assistant turns in one episode.")
    step_timeout_s: float = Field(
        30.0, gt=0, description="Longest reset() or step() call; past it the episode fails (kind 'timeout')."
    )
    num_workers: int = Field(
        0, ge=0, description="0: environments run in child processes beside each rollout worker; N > 0: in a pool of "
        "N Ray actors named env-0..env-N-1, scaled apart from the rollout workers."
    )
    resources: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 1}, description="Ray resources of each env actor (env.num_workers > 0): "
        "num_cpus, num_gpus, memory, resources."
    )
    processes_per_worker: int = Field(
        2, ge=1, description="Environment host processes per rollout worker (or per env actor); episodes are spread "
        "over them round-robin, so one crash fails fewer episodes."
    )
    threads_per_process: int = Field(
        64, ge=1, description="Threads running synchronous reset/step calls in each host process (async ones share "
        "one event loop there)."
    )
    memory_limit_mb: int | None = Field(
        4096, ge=64, description="Address-space limit (RLIMIT_AS) of each host and tool process, in MiB; null: none."
    )
    tools: str | None = Field(
        None, description="'path/to/file.py:TOOLS', a list of plain functions: selects the built-in tool environment "
        f"({TOOL_ENV_CLASS}); JSON schemas come from type hints and docstrings."
    )
    tool_parser: str = Field("hermes", description="How tool calls are read from the assistant's text (hermes: "
                             "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>).")
    tool_timeout_s: float = Field(
        15.0, gt=0, description="Longest run of one tool call (in its own process); past it the model reads an error."
    )

    @property
    def enabled(self) -> bool:
        """Whether episodes are multi-turn (an environment class or a tool list is set)."""
        return self.class_ is not None or self.tools is not None

    @property
    def class_spec(self) -> str | None:
        """The class the hosts construct: env.class, or the built-in tool environment when only env.tools is set."""
        return self.class_ or (TOOL_ENV_CLASS if self.tools else None)

    @field_validator("class_", "tools")
    @classmethod
    def _spec_shape(cls, spec: str | None) -> str | None:
        target, sep, name = (spec or "").rpartition(":")
        if spec is not None and not (sep and target and name):
            raise ValueError(f"{spec!r}: expected 'path/to/file.py:Name' or 'package.module:Name'")
        return spec

    @field_validator("resources")
    @classmethod
    def _resource_keys(cls, resources: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(resources) - set(RAY_RESOURCE_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; allowed: {list(RAY_RESOURCE_KEYS)}")
        return resources

    @model_validator(mode="after")
    def _tool_budget(self) -> EnvConfig:
        if self.tools and self.tool_timeout_s >= self.step_timeout_s:
            raise ValueError(
                f"env.tool_timeout_s ({self.tool_timeout_s:g}) must be below env.step_timeout_s ({self.step_timeout_s:g}): "
                "the tool calls of a turn run inside its step() call"
            )
        return self
