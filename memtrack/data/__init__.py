"""Training data: records, image opening, and the readers for folders, webdataset, parquet."""
