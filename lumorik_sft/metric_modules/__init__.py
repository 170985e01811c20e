"""Self-contained `evaluate` metric scripts (BLEU, ROUGE) that load offline.

Each file is copied by `evaluate.load(path)` into its own module cache, so it must not
import anything from `lumorik_sft`: only `evaluate`, `datasets` and the metric library.
Load them with `lumorik_sft.metrics.load_metric("bleu")` / `load_metric("rouge")`.
"""
