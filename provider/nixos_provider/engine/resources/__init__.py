"""A declared NixosMachine or NixProfile, whole: from its declaration (plain values in schema.json's names, as
`engine.declaration` holds them) to the lifecycle's goals, and the record that comes back, in those names again.

`fleet` is what every resource of one process shares (settings, evaluations, builds, the engine, what it created);
`machines` and `profiles` answer each operation a front end that keeps state asks (check's defaults, diff, create,
update, preview, refresh, import, delete), `changes` says what a new declaration changes, `records` turns a record
into properties and back. The Pulumi layer only marks what is secret and what a preview cannot know.
"""
