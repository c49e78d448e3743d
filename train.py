"""Fine-tune Moshi (LoRA or full) from a YAML config.

    python -m train example/tiny.yaml                          # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 -m train example/moshi_7B.yaml  # several GPUs (FSDP2)
    torchrun --nproc-per-node 1 -m train example/qwen.yaml     # DSAA (text_llm.enable; after setup_new_model)

Thin entry point: config → components → loop → close (see `finetune/trainer.py`).
"""

from __future__ import annotations

import logging

import fire

from finetune.args import TrainArgs
from finetune.distributed import destroy_distributed
from finetune.logging_utils import setup_logging
from finetune.trainer import Trainer

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


if __name__ == "__main__":
    fire.Fire(train)
