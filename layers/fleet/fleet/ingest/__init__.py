"""The ingest: POST /api/fleet/ingest and its ledger.

``http`` holds the one table from what went wrong to an HTTP answer; ``service`` the
rules (authentication, admission, the batch in one transaction, the audit trail);
``parse`` and ``codec``/``spans`` read bodies; ``store``, ``digests`` and
``admission`` are the data access; ``records`` the types they share.
"""
