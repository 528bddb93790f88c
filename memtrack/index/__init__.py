"""The reference index of the training set: build, update, search, content hash, recall."""
