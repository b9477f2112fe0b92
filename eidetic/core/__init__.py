"""The bottom layer: errors, durable writes, naming, hashing, line formats. Knows no store."""
