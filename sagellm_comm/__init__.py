"""sagellm-comm."""
