"""charrnn: character-level recurrent networks on JAX — train on a text file, sample in its style.

    import charrnn
    result = charrnn.train("corpus.txt", charrnn.RunConfig(train=charrnn.TrainConfig(max_steps=500)))
    run = charrnn.load(result.run_dir)
    print(run.sample(length=200, temperature=0.8)[0].text)

Importing the package is cheap and changes nothing in the process: the names below are
resolved on first use (PEP 562), so ``charrnn --help`` answers without starting JAX.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "DataConfig": "charrnn.config", "ModelConfig": "charrnn.config", "RunConfig": "charrnn.config",
    "SampleConfig": "charrnn.config", "TrainConfig": "charrnn.config",
    "CharrnnError": "charrnn.errors", "CheckpointError": "charrnn.errors",
    "Run": "charrnn.inference", "Sample": "charrnn.inference", "load": "charrnn.inference",
    "CharRNN": "charrnn.model",
    "TrainResult": "charrnn.train", "train": "charrnn.train",
    "Vocab": "charrnn.vocab",
}

__all__ = [
    "CharRNN", "CharrnnError", "CheckpointError", "DataConfig", "ModelConfig", "Run", "RunConfig",
    "Sample", "SampleConfig", "TrainConfig", "TrainResult", "Vocab", "load", "train", "__version__",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'charrnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``charrnn.train`` binds it as an
    attribute of the package, which would hide the function ``charrnn.train``; the function
    is bound instead (as the eager imports this package once had did)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _started_as_the_command() -> bool:
    """Whether this import starts the ``charrnn`` command (``python -m charrnn[.cli]`` or the
    console script), judged without importing anything."""
    if sys.argv[:1] == ["-m"]:  # Python is locating the module given to -m
        argv = list(getattr(sys, "orig_argv", ()))
        return "-m" in argv and argv[argv.index("-m") + 1:][:1] in (["charrnn"], ["charrnn.cli"])
    main = sys.modules.get("__main__")
    return (getattr(main, "__file__", None) or "").replace("\\", "/").rsplit("/", 1)[-1] == "charrnn"


if _started_as_the_command():
    # The charrnn command's own process: take Ctrl-C and SIGTERM over first of all, so a
    # signal while the rest imports ends it with one line (see charrnn.runtime).
    from charrnn import runtime as _runtime

    if _runtime.launched_as_command() or sys.argv[:1] == ["-m"]:
        _runtime.install_signal_handling()
