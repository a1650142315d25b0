"""Special tokens with fixed ids, shared by the tokenizer, the shards and generation."""

EOS = "<|endoftext|>"  # ends every document in the token stream
PAD = "<|pad|>"
SEP = "<|sep|>"  # between prompt and completion; between description and code in few-shot prompts

SPECIAL_TOKENS = [EOS, PAD, SEP]  # in id order: the tokenizer is trained with this list first
EOS_ID, PAD_ID, SEP_ID = 0, 1, 2
