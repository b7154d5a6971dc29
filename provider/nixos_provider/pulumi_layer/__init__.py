"""The Pulumi layer: turns provider RPCs into engine calls. It never runs shell commands."""
