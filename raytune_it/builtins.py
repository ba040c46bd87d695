"""The built-in names a config may use: the generated task families (with their domains) and the tiny models.

They live here, at the bottom of the house beside ``errors`` and ``hardware``, so that ``config/`` can
validate them without importing the data generator (``data.synthetic``, which binds each family to the
code that writes its examples) or the model builder (``models.tiny``, which knows each model's shape).
Both of those build their tables from these names and fail at import if they drift apart.
"""

#: Generated task family -> its domain ("general" families measure performance and generalization).
BUILTIN_FAMILIES: dict[str, str] = {
    "arithmetic": "general", "unit_conversion": "general", "reverse_words": "general", "uppercase": "general",
    "sort_numbers": "general",
    "dosage": "medicine", "symptom_system": "medicine", "bmi": "medicine",
    "clause_type": "law", "deadline": "law",
    "simple_interest": "finance", "percent_change": "finance", "expense_category": "finance",
}
#: The built-in tiny models, built locally on first use: tiny-llama (the default) and today's families.
TINY_MODEL_NAMES: tuple[str, ...] = ("tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-mistral")
