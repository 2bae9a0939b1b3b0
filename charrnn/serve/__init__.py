"""``charrnn serve``: trained runs behind an OpenAI-compatible HTTP API, with a web playground.

    from charrnn.serve import ServeLimits, create_app
    app = create_app({"shakespeare": charrnn.load("runs/shakespeare")}, ServeLimits())
    # then: uvicorn.run(app, host="127.0.0.1", port=8000)

Needs the ``serve`` extra (FastAPI and uvicorn): ``pip install -e ".[serve]"``.
"""

from charrnn.serve.limits import ServeLimits

__all__ = ["ServeLimits", "create_app"]


def create_app(*args, **kwargs):
    """``charrnn.serve.app.create_app``, imported on first use so that importing this package
    does not need FastAPI."""
    from charrnn.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
