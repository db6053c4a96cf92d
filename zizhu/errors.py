"""Exception types: each message should name the fix, not just the symptom."""


class ZizhuError(Exception):
    """Base class for every error zizhu raises on purpose."""


class ConfigError(ZizhuError):
    """config.json is missing, malformed, or describes a model zizhu cannot run."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's model_type (or architecture) has no implementation here."""


class CheckpointError(ZizhuError):
    """Weights are missing, mis-shaped, or the shard index is inconsistent."""


class ModelNotFoundError(ZizhuError):
    """A model id is neither a local directory nor in the local Hugging Face cache."""


class InvalidRequestError(ZizhuError, ValueError):
    """A request the engine must refuse: bad prompt or bad sampling values.

    `param` names the offending field so the server can fill OpenAI's error body.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EmptyPromptError(InvalidRequestError):
    """A prompt with no tokens: there is nothing to condition on."""


class PromptTooLongError(InvalidRequestError):
    """Prompt plus requested output does not fit max_model_len; never truncated silently."""

    def __init__(self, message: str, prompt_tokens: int, limit: int):
        super().__init__(message, param="messages")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling value outside its valid range (negative temperature, top_p 0, ...)."""


class QueueFullError(ZizhuError):
    """The waiting queue is at capacity; the caller should retry later (HTTP 503)."""
