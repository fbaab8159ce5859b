"""The region-feature store: Parquet schema, writer, reader, TSV and other exports."""
