"""Settings: YAML read into typed, frozen dataclasses (data sections, experiments, searches, the demo)."""
