"""Metrics (above models, balancers and data; below the engine, whose validation uses them):
``functional`` holds AUC, GAUC, LogLoss, NDCG@K and the positive rate as tensor functions (on the
GPU when the scores are there), ``split`` scores a whole split with a model. May import data and
core; knows nothing of the loop."""
