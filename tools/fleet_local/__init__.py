"""fleet_local: the fleet-pipeline tools a developer or operator runs on a laptop.

The ``fleet`` command, the local runner of ``template.yaml`` (workers, HTTP API
emulation, schedules), the throwaway PostgreSQL cluster, the demo and the status
report. Installed in the development environment only; the Lambda layer carries
the runtime package ``fleet`` and never this one.
"""
