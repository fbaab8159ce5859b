"""The region-feature store's public API in one import (writer.py writes, reader.py reads).

    from ray_updown.features.store import FeatureRecord, StoreMeta, write_feature_shard, FeatureStore
"""

from ray_updown.features.reader import FeatureStore, RegionFeatureDataset, build_index, pad_regions
from ray_updown.features.schema import StoreMeta, error_schema, feature_schema
from ray_updown.features.writer import (
                                        FeatureRecord,
                                        error_shard_uri,
                                        feature_shard_uri,
                                        infer_image_id_type,
                                        records_to_table,
                                        table_to_records,
                                        write_error_shard,
                                        write_error_table,
                                        write_feature_shard,
                                        write_feature_table,
)

__all__ = [
    "FeatureRecord", "FeatureStore", "RegionFeatureDataset", "StoreMeta", "build_index",
    "error_schema", "error_shard_uri", "feature_schema", "feature_shard_uri",
    "infer_image_id_type", "pad_regions", "records_to_table", "table_to_records",
    "write_error_shard", "write_error_table", "write_feature_shard", "write_feature_table",
]
