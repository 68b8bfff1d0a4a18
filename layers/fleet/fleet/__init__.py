"""fleet: the shared code of the fleet telemetry pipeline.

Handlers in ``functions/`` stay thin and call into this package: domain modules
(ingest, push, customers, migrations) and the data-access modules they use.
"""

__version__ = "0.1.0"
