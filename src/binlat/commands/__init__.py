"""The `binlat` subcommands, one module per idea: images (generate, edit, interpolate, continue, serve), training
(train, probe, precompute, params, export), models (convert-official, conformance, bundle) and evaluation (eval,
bench). Each takes the parsed arguments of binlat.cli, calls the public API and prints; nothing here parses."""
