"""``python -m layerkv_operator``: run the operator with the settings from the environment.

Equivalent to ``kopf run -m layerkv_operator.handlers`` with the flags the environment
asks for: the watched namespaces (or all), peering (so only one replica acts at a time)
or standalone, and the liveness endpoint.
"""

from __future__ import annotations

import logging
import random
import sys

import kopf

from layerkv.common.serving import start_metrics_server
from layerkv_operator import handlers
from layerkv_operator.config import OperatorConfig


def main() -> None:
    config: OperatorConfig = handlers.CONFIG
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    start_metrics_server(config.metrics_port)
    kopf.run(
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        standalone=config.peering_name is None,
        peering_name=config.peering_name,
        # Kopf's peering pauses the replicas of lower priority; distinct random
        # priorities make exactly one replica active (ties are 1 in 32767).
        priority=random.randint(1, 32767),
        liveness_endpoint=config.liveness_endpoint,
    )


if __name__ == "__main__":
    main()
