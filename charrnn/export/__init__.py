"""Exports of a trained run that work without charrnn: ONNX (``onnx``) and a web page (``html``).

Each exporter lives in its own module and imports its optional packages only when called, so
``import charrnn`` never needs them.
"""
