"""Pipeline parallelism: layer split over stages, p2p exchange, and the schedules."""

from megalite.parallel.pipeline.schedules import (  # noqa: F401
    SCHEDULE_FNS,
    forward_backward_1f1b,
    forward_backward_afab,
    forward_backward_interleaved,
    get_pipeline_schedule,
)
from megalite.parallel.pipeline.stages import (  # noqa: F401
    StageSpec,
    check_schedule,
    resolve_schedule,
    split_layers,
    stage_specs,
)
