"""Training metrics: console lines, JSONL files, optional TensorBoard and wandb."""

from finetune.monitoring.metrics_logger import MetricsLogger
from finetune.monitoring.utils import ThroughputMeter, format_eval_line, format_train_line, peak_memory_gib

__all__ = ["MetricsLogger", "ThroughputMeter", "format_eval_line", "format_train_line", "peak_memory_gib"]
