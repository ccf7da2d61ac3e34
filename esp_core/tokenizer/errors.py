"""Errors of the tokenizer package (one module so that every other module can import it)."""


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or used (bad directory, bad template, bad input)."""


class ChatTemplateError(TokenizerError):
    """A chat template failed to compile or render, or asked to fail (raise_exception)."""
