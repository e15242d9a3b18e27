"""Super-resolution: a WDSR-style ×s network (:mod:`hyperhuman.sr.model`) that upscales generated
images, its training recipe (``hyperhuman train-sr``) and SR metrics; ``hyperhuman prune`` searches
its per-block widths and depth at a latency target (:mod:`distill.sr_search`).

It lives in ``hyperhuman/`` beside the LSDM and the SGR, not in ``distill/``: the network is a
model of the product (the last stage of generation), and the pruning search is what distill adds.
"""

from hyperhuman.sr.model import SuperResolutionNet

__all__ = ["SuperResolutionNet"]
