"""Pipeline parallelism: schedules (gpipe, 1f1b) as lists of actions per stage, validated
and timed before they run, and the config checks a pipeline run needs."""

from narun.pipeline.schedule import (
    KINDS,
    SCHEDULES,
    Action,
    Schedule,
    ScheduleError,
    Simulation,
    check_pipeline,
    gpipe,
    make_schedule,
    one_f_one_b,
    simulate,
    validate,
)

__all__ = [
    "KINDS", "SCHEDULES", "Action", "Schedule", "ScheduleError", "Simulation",
    "check_pipeline", "gpipe", "make_schedule", "one_f_one_b", "simulate", "validate",
]
