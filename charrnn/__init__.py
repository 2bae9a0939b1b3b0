"""charrnn: character-level recurrent networks on JAX — train on a text file, sample in its style.

    import charrnn
    result = charrnn.train("corpus.txt", charrnn.RunConfig(train=charrnn.TrainConfig(max_steps=500)))
    run = charrnn.load(result.run_dir)
    print(run.sample(length=200, temperature=0.8)[0].text)
"""

from charrnn.config import DataConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from charrnn.errors import CharrnnError, CheckpointError
from charrnn.inference import Run, Sample, load
from charrnn.model import CharRNN
from charrnn.train import TrainResult, train
from charrnn.vocab import Vocab

__version__ = "0.1.0"

__all__ = [
    "CharRNN", "CharrnnError", "CheckpointError", "DataConfig", "ModelConfig", "Run", "RunConfig",
    "Sample", "SampleConfig", "TrainConfig", "TrainResult", "Vocab", "load", "train", "__version__",
]
