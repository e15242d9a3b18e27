"""HumanVerse shards: sample schema, codecs, writer, readers, validation.

from shards import ShardWriter, Sample, wds_handler
"""

from shards.reader import complete_shard_urls, ray_decoder, read_shard
from shards.sample import Sample, check_key, encode_sample, wds_handler
from shards.writer import ShardWriter, write_manifest

__all__ = [
    "Sample",
    "ShardWriter",
    "check_key",
    "complete_shard_urls",
    "encode_sample",
    "ray_decoder",
    "read_shard",
    "wds_handler",
    "write_manifest",
]
