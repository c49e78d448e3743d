"""Our re-implementation of Kyutai's Moshi LM and Mimi codec, weight-compatible with theirs."""
