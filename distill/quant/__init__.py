"""Quantization: fake quantizers for QAT (:mod:`.schemes`, :mod:`.layers`) and PIM quantization
(:mod:`.pim`)."""
