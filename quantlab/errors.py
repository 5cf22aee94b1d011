"""Errors a user can act on. The CLI prints their message as one paragraph and exits with code 2."""

from __future__ import annotations


class QuantlabError(Exception):
    """Base class of every error quantlab raises on purpose."""


class InputError(QuantlabError):
    """Bad user input: a recipe, a path, a model, data or a setting that cannot work.

    The message must say what is wrong, where (file, line, key or layer) and how to fix it.
    """
