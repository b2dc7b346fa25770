"""The manifest schema (versioned). Runs write under manifests/runs/ by default (git-ignored)."""
