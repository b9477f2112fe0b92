"""The server side: config, inbox, ingest, daemon, mail, status, purge, deploy, reading history."""
