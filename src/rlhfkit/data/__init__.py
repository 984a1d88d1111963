"""Data: reading files (io), formats and canonical records (formats), chat rendering and loss masks (chat),
batches and packing (collate)."""
