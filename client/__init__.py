"""The hospital side: a Flower ClientApp over ``common``."""
