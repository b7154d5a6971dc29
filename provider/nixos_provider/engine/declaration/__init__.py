"""A machine or profile as declared: its settings in one JSON shape, named as schema.json names them
(`connection.port`, `secretFiles[0].mode`), from any front end: the Pulumi layer's inputs (secrets revealed,
values not known yet as `values.UNKNOWN`), or `nixos-deploy`'s flags.

`input_rules` holds a declaration to all its rules (`checks`: one field; `machine_checks`: a machine's own), each
failure naming the setting's path and never echoing a secret; `typed_inputs` and `conversion` turn a checked
declaration into the engine's models, and a recorded `secretFiles` output back into them.
"""
