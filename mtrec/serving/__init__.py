"""Serving (above the engine): ``evaluate`` rebuilds a saved run and scores a split or a raw log,
``predict`` writes a run's probabilities for raw logs. Reads runs, never trains. May import the
engine and everything below it."""
