"""Serving (above the engine): ``evaluate`` rebuilds a saved run and scores a split or a raw log,
``predict`` writes a run's probabilities for raw logs, ``encoder`` picks the run's own copy of its
vocabularies, ``export`` (with ``export_encoding``) writes a run as one ONNX graph. Reads runs,
never trains. May import the engine and everything below it."""
