"""The calibration engine: block-by-block statistics for passes that learn from data.

GPTQ, SparseGPT, Wanda, SmoothQuant and activation-aware structured pruning all need
statistics of the inputs each layer sees. :func:`calibrate` runs a model's repeated blocks one
at a time over the calibration batches, with small statistics hooks (:class:`InputStats`:
``X^T X``, per-channel sums of squares, absolute maxima; padding excluded), lets each pass solve
its modules, and feeds the next block; under ``torch.distributed`` each rank takes a shard of
the batches and the statistics are all-reduced before every solve.
"""

from ._blocks import find_blocks
from ._capture import BlockInput, capture_inputs
from ._dist import shard, world
from ._engine import CalibrationResult, Solver, calibrate
from ._memory import PeakMemory, rss_bytes
from ._pass import CalibrationPass, Sweep
from ._stats import STAT_KINDS, InputStats, input_width, layer_input
from ._weights import ShardedWeights

__all__ = [
    "STAT_KINDS",
    "BlockInput",
    "CalibrationPass",
    "CalibrationResult",
    "Sweep",
    "InputStats",
    "PeakMemory",
    "ShardedWeights",
    "Solver",
    "calibrate",
    "capture_inputs",
    "find_blocks",
    "input_width",
    "layer_input",
    "rss_bytes",
    "shard",
    "world",
]
