"""Job matching over collections: ROME 4.0 occupations and profile-to-item matching."""
