"""Token ids shared by the model, the data pipeline and the loss."""

# Token embedded as exact zeros and excluded from every loss mask ("no token at this position").
ZERO_TOKEN_ID = -1
# Placeholder for "not sampled yet" in streaming generation; never embedded.
UNGENERATED_TOKEN_ID = -2
# Moshi's text PAD and end-of-padding ids in its 32000-token SentencePiece vocabulary.
MOSHI_TEXT_PADDING_ID = 3
MOSHI_TEXT_END_PADDING_ID = 0
