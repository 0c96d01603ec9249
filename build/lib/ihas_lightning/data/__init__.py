"""Data: raw Criteo/Avazu -> Parquet (prepare), the planted synthetic dataset, the DataModule."""
