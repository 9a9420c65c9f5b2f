"""The table contracts (JSON, language-neutral) ship inside the package as ``rolo_batch.schemas``."""
