"""Predictors: for every expert of a layer, the probability it is used at that layer's next visit."""
