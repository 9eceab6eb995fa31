"""Exceptions shared by the agent's modules."""


class RequestError(ValueError):
    """A server request the agent cannot carry out as given; the message goes to the server."""
