"""Data: reading files (io), formats and canonical records (formats), a row's values as messages (messages), chat
rendering and loss masks (chat), batches and packing (collate)."""
