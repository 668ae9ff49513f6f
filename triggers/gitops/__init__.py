"""GitOps promotion: deploy files in git, published and reconciled by the service."""
