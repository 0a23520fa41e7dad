"""The project's own exceptions: bad input (the CLI shows it without a traceback and exits 2), and the
ways a job stops on purpose (preemption, actors lost beyond their restarts)."""


class InvalidInput(ValueError):
    """Bad user input (config, data file, reward function path); the message names the field, file or line."""


class Preempted(RuntimeError):
    """The job was asked to stop (SIGTERM) and stopped at a step boundary after writing a checkpoint."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped on SIGTERM after step {step}; checkpoint {checkpoint}; continue with --resume")
        self.step, self.checkpoint = step, checkpoint


class WorkersLost(RuntimeError):
    """No rollout worker is left in service and none came back within faults.restart_timeout_s."""


class TrainerFailed(RuntimeError):
    """A trainer rank died or hung; its ZeRO world cannot go on, so the groups are rebuilt from a checkpoint."""


class FailureBudgetExceeded(RuntimeError):
    """Too many samples could not be scored over the last steps (faults.max_failed_frac): training on what is
    left would train on little or nothing, so the job checkpoints and stops."""
