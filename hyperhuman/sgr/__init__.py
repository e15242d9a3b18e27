"""Structure-Guided Refiner (HyperHuman stage 2): pose, depth and normal steer a frozen base UNet."""

from hyperhuman.sgr.model import (
    CONDITIONS,
    PAPER_DROP_PROBABILITIES,
    ConditionEmbedder,
    DroppedConditions,
    StructureGuidedRefiner,
    drop_conditions,
    refiner_forward,
)

__all__ = [
    "CONDITIONS",
    "PAPER_DROP_PROBABILITIES",
    "ConditionEmbedder",
    "DroppedConditions",
    "StructureGuidedRefiner",
    "drop_conditions",
    "refiner_forward",
]
