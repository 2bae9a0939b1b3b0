"""``python -m charrnn``: the ``charrnn`` command."""

from charrnn import runtime

runtime.install_signal_handling()  # first: a Ctrl-C while the rest imports ends the command cleanly

from charrnn.cli import main  # noqa: E402

main()
