"""The smallest tokenizer the tests train and load: one encoder and one decoder block of 2 heads x 16, 16 tokens x 16
bits over 8 px patches. One definition for the test families that build it (train, reliability, faults)."""

TINY_TOKENIZER_MODEL = {
    "patch_size": 8,
    "num_tokens": 16,
    "num_bits": 16,
    "encoder_layers": 1,
    "encoder_heads": 2,
    "encoder_head_dim": 16,
    "decoder_layers": 1,
    "decoder_heads": 2,
    "decoder_head_dim": 16,
    "rope_axes_dims": [4, 6, 6],
    "downsample_after": [0],
    "upsample_after": [0],
}
