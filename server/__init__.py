"""The coordinating side: a Flower ServerApp over ``common``."""
