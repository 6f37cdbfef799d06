"""Data plane: DICOM decoding and de-identification, dataset sources, phantoms, shards, streams."""
