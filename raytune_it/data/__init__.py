"""Alpaca data: records, the prompt template, tokenization with masking and packing, generated tasks."""
