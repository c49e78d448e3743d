"""Fine-tuning of Moshi and DSAA models: config, data, training loop, checkpoints."""
