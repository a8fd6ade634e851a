"""The scheduler (api-server, 服务入口): the OpenAI API in front of prefill and decode instances.

Library entry: ``run_scheduler(config)``; build the config with ``config_from_argv(argv)`` (a role
daemon's whole command line, vLLM flags included) or ``config_from_args(namespace)``.
"""

from pdserve.scheduler.config import InstanceSpec, SchedulerConfig, config_from_args, config_from_argv
from pdserve.scheduler.serve import run_scheduler, serve

__all__ = ["InstanceSpec", "SchedulerConfig", "config_from_args", "config_from_argv", "run_scheduler", "serve"]
