"""Loading base models and describing their architecture."""
