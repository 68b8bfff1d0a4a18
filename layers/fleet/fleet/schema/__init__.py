"""The schema of both roles: the sql/ files (files), their runner (runner,
repeatable), the entry point and the rules for changing the schema (migrate), the
portal's cursor column and indexes (portal), the profile set-up and maintenance
(profiles), and the bootstrap custom resource (bootstrap, custom_resource)."""
