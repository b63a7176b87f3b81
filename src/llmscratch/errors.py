"""Error types for mistakes in the user's input, one per domain.

Each message says what is wrong, where (the file, field or value) and what to do.
The command line prints them without a traceback; library users can catch them.
"""


class LLMScratchError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(LLMScratchError, ValueError):
    """A configuration value that breaks a rule; the message names the field."""


class CorpusError(LLMScratchError):
    """A corpus that cannot be read or is unusable (missing, empty, not decodable, too small)."""


class TokenizerError(LLMScratchError):
    """A tokenizer that cannot be built or loaded, or text it cannot encode."""


class ChatTemplateError(LLMScratchError):
    """A chat template that cannot be compiled, or that refuses a conversation; the message names the template."""


class ChatError(LLMScratchError):
    """A conversation that cannot be had: a model with no chat format, a saved conversation that
    cannot be read, a message too long for the model's context."""


class CheckpointError(LLMScratchError):
    """A run directory or weights file that is missing, corrupted or does not match its config."""


class Stopped(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the work; ``saved``: the log has already said where it is saved.

    A KeyboardInterrupt, so a caller stops too; the command line exits with ``128 + signum``,
    as a shell reports a command the signal ended.
    """

    def __init__(self, signum: int, saved: bool = False):
        super().__init__(signum)
        self.signum, self.saved = signum, saved

