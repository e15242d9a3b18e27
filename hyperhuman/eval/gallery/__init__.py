"""Static HTML galleries, openable from disk: :func:`shard_gallery` (kept samples of shards with
every modality, rejected rows by status and rule) and :func:`generation_gallery` (an eval run's
generations with their scores); :mod:`~hyperhuman.eval.gallery.templates` holds what both share."""

from hyperhuman.eval.gallery.run import generation_gallery
from hyperhuman.eval.gallery.shards import shard_gallery

__all__ = ["generation_gallery", "shard_gallery"]
