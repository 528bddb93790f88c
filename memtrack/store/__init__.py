"""The resumable run store: evaluations, thumbnails, schema migrations."""
