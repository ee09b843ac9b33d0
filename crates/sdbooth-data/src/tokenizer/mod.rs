//! CLIP BPE tokenizer with exact parity to transformers + ftfy (see issue 2, item 5).
