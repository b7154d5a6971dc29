"""The deploy engine: plain async Python over asyncssh and the local nix CLI.

It never imports Pulumi; the provider layer adapts it (DESIGN §3).
"""
