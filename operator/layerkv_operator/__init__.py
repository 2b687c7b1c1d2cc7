"""The layerkv Kopf operator: ServingSLO custom resources -> SLO targets in Redis and
worker Deployment replicas. ``python -m layerkv_operator`` runs it."""
