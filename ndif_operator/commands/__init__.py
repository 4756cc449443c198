"""One module per `ndif-operator` subcommand (see ndif_operator.cli)."""
