"""The one base class for errors a person can act on: stages print them without a traceback."""


class PipelineError(Exception):
    """Bad input, config or state that the message explains; not a bug in the pipeline."""
