"""FedLesion core: model, data, losses, metrics, transforms and train/eval/infer.

Nothing in this package imports Flower, so every piece can be used, tested and
benchmarked without a federation.
"""
