"""A machine's or profile's whole lifecycle in engine terms (DESIGN §3).

`models` holds the terms (records, goals, `ConvergeFailed`, `Limits`) and is light to import; `engine.Engine` runs
the operations: a machine converged (`machine`: install or adopt, build, secret files, deploy, health), a profile
converged (`profile`), what a preview shows (`preview`), what refresh reads and destroy undoes. The deployment's
failures become records of what runs (`deployment`). Nothing here knows of Pulumi.
"""
