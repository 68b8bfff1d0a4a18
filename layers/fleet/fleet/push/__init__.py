"""The push: a Client stack's tick that copies the portal's sites, devices and
measurements to the Admin ingest, and reconciles what it sent."""
