"""Machine learning for EvoClone: records, features, models, DP training, Flower apps."""
