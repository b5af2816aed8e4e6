"""dgrt's exports in the tools users already have."""
