"""Loading the base model and tokenizer."""
