"""Training on Ray Train: one loop (`loop`) and its two models, the generalist (`generalist_trainer`) and CLIP (`clip_trainer`)."""


def quiet_dashboardless_ray() -> None:
    """`worker_process_setup_hook` of the local Ray `galen` starts without its dashboard, hence
    without the State API: Ray Train's placement-group cleaner would warn that it cannot query it
    once a second for the whole run (hundreds of lines in `dvc repro`). Only that logger is quieted."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
