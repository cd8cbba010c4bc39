"""The step oracle: sclref's SCL step as the reference a PyTorch or JAX implementation is checked against.

`reference_step` runs sclref's own training step from a user's state and batch and keeps
every intermediate in float64; `compare` takes the user's tensors of the same step and
names the earliest stage that disagrees, with a diagnosis when a known mistake explains
it; `assert_step_matches` is the same as a pytest assertion. `load_state` and
`export_state` move a model's state between sclref and PyTorch's or Flax's names and
array layouts. docs/verify.md shows the whole workflow.
"""

from sclref.oracle.compare import (
    TOLERANCES,
    Comparison,
    TensorComparison,
    Tolerance,
    assert_step_matches,
    compare,
)
from sclref.oracle.settings import AdamSettings, SGDSettings, StepSettings
from sclref.oracle.state import LAYOUTS, StateLayout, export_state, flatten_names, load_state
from sclref.oracle.step import STAGES, StepRecord, StepResult, reference_step

__all__ = ["LAYOUTS", "STAGES", "TOLERANCES", "AdamSettings", "Comparison", "SGDSettings", "StateLayout",
           "StepRecord", "StepResult", "StepSettings", "TensorComparison", "Tolerance", "assert_step_matches",
           "compare", "export_state", "flatten_names", "load_state", "reference_step"]
