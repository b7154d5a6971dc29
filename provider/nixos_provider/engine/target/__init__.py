"""The target side: supervised activation and its protocol, profiles, secret files, health, reboots."""
