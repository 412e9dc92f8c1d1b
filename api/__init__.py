"""HTTP only: FastAPI routers per resource, auth dependencies, problem+json errors."""
