"""Evaluation: the paper's metrics, ``hyperhuman eval`` and the HTML galleries.

- :mod:`hyperhuman.eval.fid`: FID and KID×1000 from image features (batch-by-batch statistics),
  the FID Inception-v3 from local weights;
- :mod:`hyperhuman.eval.clip`: FID_CLIP and CLIP score with a CLIP model from a local folder;
- :mod:`hyperhuman.eval.pose`: COCO keypoint AP/AR (OKS) and the "clean" AP/AR;
- :mod:`hyperhuman.eval.evaluate`: ``hyperhuman eval`` (conditions from shards, generation,
  resume); :mod:`~hyperhuman.eval.fingerprint`: what a resumed folder must have been made with;
  :mod:`~hyperhuman.eval.scores`: the metrics of one eval folder;
- :mod:`hyperhuman.eval.gallery`: static HTML galleries of shards and of eval runs.

Each metric is checked against a reference implementation (torchmetrics, pycocotools) in
``tests/hyperhuman/test_metrics.py``. Heavy imports stay in these modules, none here.
"""
