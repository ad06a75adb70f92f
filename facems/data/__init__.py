"""Data: RecordIO packs, face datasets, the distributed P x K sampler, alignment, .bin pair files."""
