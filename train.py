"""Fine-tune Moshi (LoRA or full) from a YAML config.

    python -m train example/tiny.yaml                          # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 -m train example/moshi_7B.yaml  # several GPUs (FSDP2)
    torchrun --nproc-per-node 1 -m train example/qwen.yaml     # DSAA (text_llm.enable; after setup_new_model)

Thin entry point: config → components → loop → close (see `finetune/trainer.py`).
"""

from __future__ import annotations

import logging
import os
import sys

import fire

from finetune.args import ConfigError, TrainArgs
from finetune.checkpointing import CheckpointError, ResumeMismatchError
from finetune.data.alignments import AlignmentError
from finetune.data.audio import AudioReadError
from finetune.data.dataset import DataError
from finetune.data.manifest import ManifestError
from finetune.data.sources import SourceError
from finetune.distributed import destroy_distributed
from finetune.logging_utils import setup_logging
from finetune.monitoring.metrics_logger import MetricsFileError
from finetune.preflight import PreflightError
from finetune.trainer import NonFiniteError, Trainer

# Problems with the user's config, data or run dir: reported as one message, no traceback
# (set MOSHI_FT_TRACEBACK=1 to see it). Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ConfigError, ResumeMismatchError, CheckpointError, ManifestError, AlignmentError, AudioReadError,
    DataError, SourceError, NonFiniteError, FileNotFoundError, FileExistsError, PreflightError, MetricsFileError,
)

logger = logging.getLogger("train")


def train(config: str) -> None:
    """Trains with the YAML file `config`; every problem with it is reported before anything is written."""
    setup_logging()
    args = TrainArgs.load(config)
    trainer = Trainer(args)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
        destroy_distributed()


def main() -> None:
    try:
        fire.Fire(train)
    except USER_ERRORS as e:
        if os.environ.get("MOSHI_FT_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
