"""Research (above serving): ``compare`` trains and summarizes a grid of runs, ``plot`` draws runs
and grids, ``tensorboard`` replays their logs as TensorBoard events. May import serving and
everything below; the engine never imports it."""
