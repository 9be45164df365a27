"""Research (above serving): ``compare`` trains and summarizes a grid of runs, ``race`` races
balancer settings within a budget (``race_runner`` trains its rungs), ``plot`` draws runs, grids
and races, ``tensorboard`` replays their logs as TensorBoard events. May import serving and
everything below; the engine never imports it."""
