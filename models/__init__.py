"""Feature vectors from live state, churn and personalization models (issue 4)."""
