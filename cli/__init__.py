"""The `gptflow` command line: a table of commands, each a typed function over the flows,
the servers (ops) and the stages. Importing it leaves the environment alone."""
