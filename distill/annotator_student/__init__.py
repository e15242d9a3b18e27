"""Student annotators distilled from the annotation job's own pseudo-labels (issue 20): an
EfficientFormerV2 pose model trained on the shards' COCO-17 keypoints (:mod:`.data`, :mod:`.model`,
:mod:`.train`), exported to ONNX (:mod:`.export`) and run by the ``efficientformer-pose``
annotator (:mod:`annotators.efficientformer_pose`)."""
