"""Speech data, metrics and models for ``recipes/run_speech.py`` (Wav2Vec2-style and Whisper models).

- :mod:`.audio`: :class:`Clip`, decoding with soundfile, polyphase resampling, Wav2Vec2's per-clip normalisation.
- :mod:`.data`: clips per split (FSDD, ``load_dataset("audiofolder")``, hub), subsets, the held-out split.
- :mod:`.text`: class labels, transcripts, the CTC character vocabulary and tokenizer.
- :mod:`.batches`: in-memory datasets, collators (the feature extractor's ``pad``), calibration batches.
- :mod:`.models`, :mod:`.whisper`: scratch Wav2Vec2 configs and task models; Whisper models and its shorter window.
- :mod:`.evaluation`: eval steps and metrics (accuracy, WER/CER with jiwer, Whisper's text normaliser).
- :mod:`.task`, :mod:`.setups`: what differs between the tasks and model families (:class:`TaskSetup`).

Every public name of these modules is importable from ``recipe_support.speech`` itself.
"""

from recipe_support.speech.audio import *  # noqa: F403
from recipe_support.speech.batches import *  # noqa: F403
from recipe_support.speech.data import *  # noqa: F403
from recipe_support.speech.evaluation import *  # noqa: F403
from recipe_support.speech.models import *  # noqa: F403
from recipe_support.speech.task import *  # noqa: F403
from recipe_support.speech.text import *  # noqa: F403
from recipe_support.speech.whisper import *  # noqa: F403
