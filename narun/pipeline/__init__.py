"""Pipeline parallelism: a model cut into stages (`plan_stages`, `StageModule`), schedules
(gpipe, 1f1b) as lists of actions per stage, validated and timed before they run, one
stage's compute for a step (`StageWork`) and the loop that runs its actions over any
transport (`run_actions`; over ZeroMQ: `StageLinks`), and the config checks a pipeline run
needs."""

from narun.pipeline.partition import StageModule, StagePlan, plan_stages, tied_names
from narun.pipeline.runner import StageIO, run_actions
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
from narun.pipeline.stage import StageWork

__all__ = [
    "KINDS", "SCHEDULES", "Action", "Schedule", "ScheduleError", "Simulation", "StageIO",
    "StageModule", "StagePlan", "StageWork", "check_pipeline", "gpipe", "make_schedule",
    "one_f_one_b", "plan_stages", "run_actions", "simulate", "tied_names", "validate",
]
