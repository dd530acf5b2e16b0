"""Speech data, metrics and models for the Wav2Vec2 recipe (``recipes/run_speech.py``).

- :mod:`.audio`: :class:`Clip` (one example), decoding with soundfile (no FFmpeg, no torchcodec), polyphase
  resampling (``scipy.signal.resample_poly``), the length cap, per-clip normalisation as
  ``Wav2Vec2FeatureExtractor`` does.
- :mod:`.data`: clips per split from the Free Spoken Digit Dataset, an audiofolder, or a hub dataset;
  :func:`subset_in_order` (a fixed random subset, kept in its original order).
- :mod:`.text`: class labels, transcripts, the CTC character vocabulary and tokenizer.
- :mod:`.metrics`: WER, CER, accuracy.
- :mod:`.batches`: :class:`SpeechDataset` and :class:`SpeechCollator` (padding, attention mask, -100 labels).
- :mod:`.models`: small scratch Wav2Vec2 configs and :func:`build_model`.

Every name is importable from ``hf_helu.training.speech`` itself.
"""

from hf_helu.training.speech.audio import (
    SAMPLING_RATE,
    AudioDecodeError,
    Clip,
    load_waveform,
    max_samples,
    normalize,
    read_audio,
    resample,
)
from hf_helu.training.speech.batches import SpeechCollator, SpeechDataset
from hf_helu.training.speech.data import (
    AUDIO_EXTENSIONS,
    DIGIT_WORDS,
    EVAL_SPLIT_PREFERENCE,
    FSDD_NAME,
    FSDD_TEST_INDICES,
    METADATA_FILE,
    SPLIT_NAMES,
    TRANSCRIPT_COLUMNS,
    audiofolder_splits,
    clips_from_datasets,
    fsdd_splits,
    hub_splits,
    is_fsdd_folder,
    load_splits,
    pick_eval_split,
    subset_in_order,
)
from hf_helu.training.speech.metrics import accuracy, char_error_rate, edit_distance, word_error_rate
from hf_helu.training.speech.models import (
    SIZES,
    TASKS,
    build_model,
    parse_config_overrides,
    scratch_config,
    scratch_feature_extractor,
    task_head,
)
from hf_helu.training.speech.text import (
    PAD_TOKEN,
    UNK_TOKEN,
    WORD_DELIMITER,
    build_vocabulary,
    check_transcripts,
    clean_transcript,
    ctc_tokenizer,
    label_ids,
    label_names,
)

__all__ = [
    "AUDIO_EXTENSIONS",
    "DIGIT_WORDS",
    "EVAL_SPLIT_PREFERENCE",
    "FSDD_NAME",
    "FSDD_TEST_INDICES",
    "METADATA_FILE",
    "PAD_TOKEN",
    "SAMPLING_RATE",
    "SIZES",
    "SPLIT_NAMES",
    "TASKS",
    "TRANSCRIPT_COLUMNS",
    "UNK_TOKEN",
    "WORD_DELIMITER",
    "AudioDecodeError",
    "Clip",
    "SpeechCollator",
    "SpeechDataset",
    "accuracy",
    "audiofolder_splits",
    "build_model",
    "build_vocabulary",
    "char_error_rate",
    "check_transcripts",
    "clean_transcript",
    "clips_from_datasets",
    "ctc_tokenizer",
    "edit_distance",
    "fsdd_splits",
    "hub_splits",
    "is_fsdd_folder",
    "label_ids",
    "label_names",
    "load_splits",
    "load_waveform",
    "max_samples",
    "normalize",
    "parse_config_overrides",
    "pick_eval_split",
    "read_audio",
    "resample",
    "scratch_config",
    "scratch_feature_extractor",
    "subset_in_order",
    "task_head",
    "word_error_rate",
]
