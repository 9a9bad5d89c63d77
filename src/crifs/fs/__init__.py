"""Pure filesystem engines: walking, usage, in-root resolution. No policy lives here."""
