"""Errors that mean "the user's input is wrong": the CLI shows them without a traceback and exits 2."""


class InvalidInput(ValueError):
    """Bad user input (config, data file, reward function path); the message names the field, file or line."""


class Preempted(RuntimeError):
    """The job was asked to stop (SIGTERM) and stopped at a step boundary after writing a checkpoint."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"stopped on SIGTERM after step {step}; checkpoint {checkpoint}; continue with --resume")
        self.step, self.checkpoint = step, checkpoint
