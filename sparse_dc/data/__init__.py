"""Data stage: prepare Arrow token shards (`prepare`), and read exact token budgets from them (`loader`)."""
