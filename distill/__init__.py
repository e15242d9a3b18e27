"""Making the models mobile-sized: students, step distillation, pruning, quantization."""

import hyperhuman  # noqa: F401  (its filters for import-time log noise)
