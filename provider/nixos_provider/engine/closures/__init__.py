"""Moving closures to targets: the push, the serve stream, substitution, binary caches, build hosts."""
