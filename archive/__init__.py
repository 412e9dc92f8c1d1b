"""The write side of loan-archive: domain, application service, storage, integrity."""
