"""The push: a Client stack's tick that copies the portal's sites, devices and
measurements to the Admin ingest, and reconciles what it sent.

Dependencies run one way, from the rules to data access and transport:

- rules: ``service`` (the tick), ``responses`` (what an answer does to a resource),
  ``readahead`` (one read's batches in flight), ``digests`` (reconciliation);
  ``report`` (what a tick tells), ``wiring`` (a service from its configuration);
- data access: ``source`` (the portal's reads), ``queries`` and ``digest_queries``
  (their statements), ``cursor``, ``codec`` (a page's JSON and gzip), ``mapping`` and
  ``catalogue`` (where the portal keeps each resource), ``state`` (DynamoDB),
  ``digest_state`` (the digests' settings and document); transport: ``transport``
  (HTTP, batches in flight).
"""
