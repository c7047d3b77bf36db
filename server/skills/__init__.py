"""Skills (ESCO v1) and career paths over the ROME catalogue: extraction, occupation profiles, transitions."""
